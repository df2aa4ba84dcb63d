"""Writing files whole or not at all: what every output of the package goes through.

A temporary file beside the target, flushed and fsync'ed, renamed over it, and the
directory entry made durable; a half-written file never appears under its name.
Standard library only.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Iterable, Union


def sync_dir(path: str) -> None:
  """Makes a new or renamed directory entry durable."""
  try:
    fd = os.open(path, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def write_atomic(path: str, data: Union[bytes, Iterable[bytes]]) -> None:
  """Writes a file whole or not at all (temp file, fsync, rename). `data` is the
  bytes, or an iterable of chunks written as they come (a large model streamed
  without its whole serialisation in memory)."""
  parent = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(prefix=".gp_tmp_", dir=parent)
  try:
    with os.fdopen(fd, "wb") as f:
      os.fchmod(f.fileno(), 0o666 & ~_umask())  # mkstemp makes 0600; these are for reading
      if isinstance(data, (bytes, bytearray, memoryview)):
        f.write(data)
      else:
        for chunk in data:
          f.write(chunk)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  sync_dir(parent)


def make_readable(path: str) -> None:
  """The mode a new file gets from the umask (a library's temporary file is 0600)."""
  os.chmod(path, 0o666 & ~_umask())


def write_text(path: str, text: str) -> None:
  write_atomic(path, text.encode("utf-8"))


def write_json(path: str, doc: Any, indent: int = 1, default=None) -> None:
  """Sorted keys, a final newline: equal documents give equal bytes."""
  write_text(path, json.dumps(doc, indent=indent, sort_keys=True, default=default) + "\n")


def _umask() -> int:
  mask = os.umask(0o022)
  os.umask(mask)
  return mask
