"""IDX files (the MNIST / Fashion-MNIST format), read with numpy alone.

Fashion-MNIST comes from the Debian package dataset-fashion-mnist, which puts
the four gzip'ed IDX files in FASHION_MNIST_DIR, so nothing needs the network.
"""

from __future__ import annotations

import gzip
import os
import struct

import numpy as np

from graph_prune import errors

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
NUM_CLASSES = 10

# File names inside the directory, as shipped by the Debian package (and upstream).
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

# IDX type byte -> big-endian numpy dtype.
_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str) -> np.ndarray:
  """Reads an IDX file (gzip'ed or not) into a numpy array of its shape.

  IDX header: two zero bytes, a type byte (0x08 = uint8), a byte with the number of
  dimensions, then each dimension as a big-endian uint32; the data follow.
  """
  try:
    with open(path, "rb") as f:
      data = f.read()
    if data[:2] == b"\x1f\x8b":  # the gzip magic number
      data = gzip.decompress(data)
  except (OSError, EOFError, gzip.BadGzipFile) as e:
    raise errors.InputError(f"cannot read IDX file '{path}' ({e})") from None
  if len(data) < 4:
    raise errors.InputError(f"'{path}' is too short for an IDX header")
  zero, dtype, ndim = struct.unpack(">HBB", data[:4])
  if zero != 0 or dtype not in _DTYPES or ndim == 0:
    raise errors.InputError(f"'{path}' has a bad IDX magic number 0x{data[:4].hex()} "
                            "(expected 0x0000TTNN: type TT, NN dimensions)")
  header = 4 + 4 * ndim
  if len(data) < header:
    raise errors.InputError(f"'{path}' has a truncated IDX header")
  shape = struct.unpack(f">{ndim}I", data[4:header])
  itemsize = np.dtype(_DTYPES[dtype]).itemsize
  if len(data) - header != int(np.prod(shape)) * itemsize:
    raise errors.InputError(f"'{path}' has {len(data) - header} data bytes, but the header's "
                            f"shape {shape} needs {int(np.prod(shape)) * itemsize}")
  array = np.frombuffer(data, dtype=_DTYPES[dtype], offset=header).reshape(shape)
  return array.astype(array.dtype.newbyteorder("="), copy=False)


def split_files(data_dir: str, split: str) -> tuple[str, str]:
  """(images, labels) paths of 'train' or 'test' in data_dir, gzip'ed or not."""
  if split not in FILES:
    raise errors.UsageError(f"unknown split '{split}'; use 'train' or 'test'")
  out = []
  for name in FILES[split]:
    for candidate in (name, name[:-len(".gz")]):
      if os.path.isfile(os.path.join(data_dir, candidate)):
        out.append(os.path.join(data_dir, candidate))
        break
    else:
      raise errors.InputError(f"'{data_dir}' has no {name}; give the directory with the "
                              "Fashion-MNIST IDX files (Debian package dataset-fashion-mnist)")
  return out[0], out[1]


def labels_file_for(images_path: str) -> str:
  """The labels file beside an images file: '...-images-idx3-ubyte' -> '...-labels-idx1-ubyte'."""
  base = os.path.basename(images_path)
  if "-images-idx" not in base:
    raise errors.InputError(f"'{images_path}' is not named like an IDX images file "
                            "(*-images-idx3-ubyte[.gz]); give its directory instead")
  labels = base.replace("-images-idx3-", "-labels-idx1-").replace("-images-idx4-", "-labels-idx1-")
  path = os.path.join(os.path.dirname(images_path), labels)
  if not os.path.isfile(path):
    raise errors.InputError(f"'{images_path}' has no labels file '{labels}' beside it")
  return path


def read_pair(images_path: str, labels_path: str) -> tuple[np.ndarray, np.ndarray]:
  """Images [N,H,W] or [N,H,W,C] as stored, and labels [N] as int64."""
  images = read_idx(images_path)
  labels = read_idx(labels_path)
  if images.ndim not in (3, 4):
    raise errors.InputError(f"'{images_path}' holds shape {images.shape}; expected images "
                            "[N, H, W] or [N, H, W, C]")
  if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
    raise errors.InputError(f"'{labels_path}' holds shape {labels.shape}, which does not "
                            f"match the {images.shape[0]} images of '{images_path}'")
  if labels.dtype.kind not in "iu":
    raise errors.InputError(f"'{labels_path}' holds {labels.dtype} values; labels must be "
                            "integer class ids")
  return images, labels.astype(np.int64)


def load_split(data_dir: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  """Fashion-MNIST 'train' or 'test': (images float32 [N,28,28,1] in [0,1], labels int32 [N])."""
  images_path, labels_path = split_files(data_dir, split)
  images, labels = read_pair(images_path, labels_path)
  if images.shape[1:] != (28, 28) or images.dtype != np.uint8:
    raise errors.InputError(f"'{images_path}' holds {images.dtype} {images.shape}; expected "
                            "uint8 [N, 28, 28]")
  if labels.min(initial=0) < 0 or labels.max(initial=0) >= NUM_CLASSES:
    raise errors.InputError(f"'{labels_path}' has a label outside the classes 0..9")
  x = (images.astype(np.float32) / 255.0)[..., np.newaxis]
  return x, labels.astype(np.int32)
