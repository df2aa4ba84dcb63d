"""Peak memory of one model at one batch size, in a child process of its own.

Every (model, batch size) gets a fresh process, so that no two share a peak.
The child imports its runtime and runs one tiny op first; that state is the
baseline. Then it loads the model, builds it, compiles it at the batch size
and runs it a few times. The peak therefore covers loading, compilation and
inference, not the interpreter or the runtime's start-up; the resident set
left after the runs (what the loaded, compiled model keeps) is reported too.

- GPU/TPU (TensorFlow): the device allocator's peak
  (`tf.config.experimental.get_memory_info`), reset after the baseline.
- CPU: the kernel's resident-set high-water mark (VmHWM of /proc/self/status)
  above the baseline RSS; VmHWM is first reset to the current RSS by writing
  "5" to /proc/self/clear_refs (Linux >= 4.0). Where that is not allowed the
  figure is VmHWM minus the RSS before loading, which undercounts when the
  imports peaked higher than the model.
- ONNX Runtime on CUDA has no allocator statistics: peak_bytes is None there.

The parent calls `measure`; the child is `python -m graph_prune.bench.memory
REQUEST_JSON RESULT_PATH`, run with the parent's interpreter and sys.path.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
from typing import Optional

from absl import logging

DEVICE_ALLOCATOR = "device_allocator"
VMHWM_RESET = "vmhwm_reset"
VMHWM_MINUS_RSS = "vmhwm_minus_rss"
UNAVAILABLE = "unavailable"


@dataclasses.dataclass(frozen=True)
class Request:
  path: str
  device: str                       # a resolved device label, e.g. "cpu:0", "gpu:0"
  batch: int
  xla: bool = True
  runs: int = 3                     # calls after the first (compiling) one
  seed: int = 0
  signature: Optional[str] = None
  inputs: tuple[str, ...] = ()
  outputs: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Peak:
  peak_bytes: Optional[int]         # device peak on GPU/TPU, host RSS peak on CPU
  method: str                       # one of the constants above, or "failed: <why>"
  host_peak_bytes: Optional[int]    # host RSS peak above the baseline, on every device
  resident_bytes: Optional[int] = None  # host RSS above the baseline after the runs


def measure(request: Request, timeout_s: float = 1800.0) -> Peak:
  """Runs the request in a fresh child process; a failed child gives a Peak with
  no figures and the reason (logged as a warning), not an exception."""
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
  fd, result_path = tempfile.mkstemp(prefix="gp_bench_mem_", suffix=".json")
  os.close(fd)
  try:
    proc = subprocess.run(
        [sys.executable, "-m", "graph_prune.bench.memory",
         json.dumps(dataclasses.asdict(request)), result_path],
        env=env, capture_output=True, text=True, timeout=timeout_s, check=False)
    if proc.returncode != 0:
      tail = [l for l in proc.stderr.splitlines() if l.strip()][-1:] or [f"exit {proc.returncode}"]
      why = f"failed: child exited with status {proc.returncode} ({tail[0][:200]})"
      logging.warning("memory of %s at batch %d: %s", request.path, request.batch, why)
      return Peak(None, why, None)
    with open(result_path, encoding="utf-8") as f:
      return Peak(**json.load(f))
  except subprocess.TimeoutExpired:
    why = f"failed: no result within {timeout_s:g} s"
    logging.warning("memory of %s at batch %d: %s", request.path, request.batch, why)
    return Peak(None, why, None)
  finally:
    os.remove(result_path)


def _status_bytes(field: str) -> int:
  with open("/proc/self/status", encoding="ascii") as f:
    found = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
  return int(found.group(1)) * 1024


def _reset_hwm() -> bool:
  try:
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
      f.write("5")
    return True
  except OSError:
    return False


def _child(request: Request) -> Peak:
  from graph_prune.bench import runners  # pylint: disable=g-import-not-at-top
  kind, _, index = request.device.partition(":")
  device = runners.Device(kind, int(index or 0))
  fmt = runners.format_of(request.path)
  runners.init_runtime(fmt, device)
  runners.device_memory(device, reset=True)
  reset = _reset_hwm()
  base = _status_bytes("VmRSS")

  loaded = runners.load(request.path, request.signature, request.inputs, request.outputs)
  runner = runners.build(loaded, device, request.xla)
  bound = runner.bind(request.batch, request.seed)
  for _ in range(1 + request.runs):
    bound.call()

  host = max(0, _status_bytes("VmHWM") - base)
  resident = max(0, _status_bytes("VmRSS") - base)
  if device.kind == "cpu":
    return Peak(host, VMHWM_RESET if reset else VMHWM_MINUS_RSS, host, resident)
  on_device = runners.device_memory(device) if fmt != runners.ONNX else None
  return Peak(on_device, DEVICE_ALLOCATOR if on_device is not None else UNAVAILABLE, host,
              resident)


def _main(argv) -> int:
  if len(argv) != 3:
    print("usage: python -m graph_prune.bench.memory REQUEST_JSON RESULT_PATH", file=sys.stderr)
    return 2
  fields = json.loads(argv[1])
  for key in ("inputs", "outputs"):
    fields[key] = tuple(fields[key])
  peak = _child(Request(**fields))
  with open(argv[2], "w", encoding="utf-8") as f:
    json.dump(dataclasses.asdict(peak), f)
  return 0


if __name__ == "__main__":
  sys.exit(_main(sys.argv))
