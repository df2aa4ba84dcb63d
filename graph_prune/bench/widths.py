"""Latency of one convolution across output widths: the staircase the hardware
makes, a cache of it, and the channel multiple it favours (--round_to=auto).

Kernels are blocked by vector width (oneDNN/XLA on CPU), tensor-core tiles
(GPU) or the MXU (TPU), so latency rises in steps, not per channel. A width
just below a step boundary costs the same as the boundary: keeping the
boundary width is free accuracy. `favoured_multiple` finds that step from
measured latencies; it is never assumed for a CPU.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import time
from typing import Mapping, Optional, Sequence

import numpy as np

from graph_prune import errors
from graph_prune import files

# Fixed multiples where the hardware documents them; CPUs are measured.
KNOWN_MULTIPLE = {"tpu": 128, "gpu": 8}
CANDIDATES = (2, 4, 8, 16, 32, 64)


@dataclasses.dataclass(frozen=True)
class Layer:
  """One NHWC convolution: input height, width and channels, square kernel, stride."""
  height: int
  width: int
  in_channels: int
  kernel: int = 3
  stride: int = 1

  @property
  def key(self) -> str:
    return f"{self.height}x{self.width}x{self.in_channels}-k{self.kernel}s{self.stride}"


# The layer --round_to=auto profiles on a CPU: a mid-network 3x3 convolution,
# large enough (batch 8) that compute, not call overhead, sets the latency.
# About a minute once per machine; then it comes from the cache.
REPRESENTATIVE = Layer(56, 56, 128, 3, 1)
REPRESENTATIVE_WIDTHS = tuple(range(97, 161))
REPRESENTATIVE_BATCH = 8


def cpu_name() -> str:
  """The CPU model (/proc/cpuinfo), else what the platform says."""
  try:
    with open("/proc/cpuinfo") as f:
      return next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
  except (OSError, StopIteration):
    return platform.processor() or platform.machine()


def device_key(xla: bool) -> str:
  """Which machine a latency belongs to: CPU model, runtime and TensorFlow version."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  gpus = tf.config.list_physical_devices("GPU")
  kind = "gpu" if gpus else "cpu"
  return (f"{kind}|{cpu_name()}|{os.cpu_count()} cores|{'xla' if xla else 'tf'}|"
          f"tf {tf.__version__}")


def default_cache() -> str:
  root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(root, "graph_prune", "widths.json")


class Cache:
  """Latency table keyed by device, layer and width, kept as JSON on disk."""

  def __init__(self, path: Optional[str]):
    self.path = path
    self._table = {}
    if path and os.path.isfile(path):
      try:
        with open(path, encoding="utf-8") as f:
          self._table = json.load(f)
      except (OSError, ValueError):
        self._table = {}  # a damaged cache is rebuilt, not trusted

  def get(self, device: str, layer: Layer, width: int) -> Optional[float]:
    return self._table.get(device, {}).get(layer.key, {}).get(str(width))

  def put(self, device: str, layer: Layer, width: int, ms: float) -> None:
    self._table.setdefault(device, {}).setdefault(layer.key, {})[str(width)] = ms

  def save(self) -> None:
    if not self.path:
      return
    os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
    files.write_json(self.path, self._table)


def _time_conv(layer: Layer, width: int, xla: bool, batch: int, runs: int) -> float:
  """Median latency in ms of the layer producing `width` channels."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(width)
  x = tf.constant(rng.standard_normal((batch, layer.height, layer.width, layer.in_channels)),
                  tf.float32)
  w = tf.constant(rng.standard_normal((layer.kernel, layer.kernel, layer.in_channels, width)),
                  tf.float32)
  fn = tf.function(lambda a: tf.nn.conv2d(a, w, layer.stride, "SAME"),
                   jit_compile=True if xla else None)
  for _ in range(3):
    fn(x).numpy()
  times = []
  for _ in range(runs):
    t0 = time.perf_counter()
    fn(x).numpy()
    times.append(time.perf_counter() - t0)
  return 1000 * statistics.median(times)


def profile(layer: Layer, widths: Sequence[int], cache: Cache, xla: bool = True,
            batch: int = 1, runs: int = 30) -> dict[int, float]:
  """Latency (ms) per width, measured where the cache has no figure for this device."""
  device = device_key(xla)
  out = {}
  for w in widths:
    ms = cache.get(device, layer, w)
    if ms is None:
      ms = _time_conv(layer, w, xla, batch, runs)
      cache.put(device, layer, w, ms)
    out[w] = ms
  cache.save()
  return out


def favoured_multiple(latency: Mapping[int, float], tolerance: float = 0.05,
                      candidates: Sequence[int] = CANDIDATES) -> int:
  """The largest m such that widening a width to the next multiple of m costs no
  more than `tolerance`: latency(k*m) <= (1 + tol) * the lower quartile of the
  latencies in (k*m - m, k*m] (a quartile, not the minimum, so that one lucky
  timing does not veto a real step). Only blocks measured in full are judged,
  and a candidate needs at least two of them; 1 when none qualifies."""
  best = 1
  for m in sorted(candidates):
    blocks = 0
    ok = True
    for top in range(m, max(latency) + 1, m):
      block = [latency.get(w) for w in range(top - m + 1, top + 1)]
      if any(v is None for v in block):
        continue
      blocks += 1
      if latency[top] > (1 + tolerance) * float(np.percentile(block, 25)):
        ok = False
        break
    if ok and blocks >= 2:
      best = m
  return best


def auto_round_to(device_kind: str, cache: Cache, xla: bool = True) -> tuple[int, str]:
  """The multiple for --round_to=auto and a line saying where it came from."""
  if device_kind in KNOWN_MULTIPLE:
    m = KNOWN_MULTIPLE[device_kind]
    return m, f"{m} ({device_kind.upper()} tiles)"
  latency = profile(REPRESENTATIVE, REPRESENTATIVE_WIDTHS, cache, xla,
                    batch=REPRESENTATIVE_BATCH, runs=15)
  m = favoured_multiple(latency)
  return m, (f"{m} (measured on this CPU: 3x3 convolution {REPRESENTATIVE.key} batch "
             f"{REPRESENTATIVE_BATCH}, widths "
             f"{REPRESENTATIVE_WIDTHS[0]}-{REPRESENTATIVE_WIDTHS[-1]}, cache {cache.path})")


def resolve_round_to(value: str, device: str = "auto", cache: Optional[str] = None,
                     xla: bool = True) -> tuple[int, str]:
  """--round_to as given: a positive integer (with no explanation), or "auto"
  resolved on `device` (its kind, as runners.resolve_device gives it: 128 on TPU,
  8 on GPU, on CPU measured and cached in `cache`). Returns (multiple, how it was
  chosen). The one resolution //tools:prune and //tools:sweep share."""
  if str(value) != "auto":
    try:
      multiple = int(value)
    except ValueError:
      raise errors.UsageError(f"--round_to must be a positive integer or 'auto', not "
                              f"'{value}'") from None
    if multiple < 1:
      raise errors.UsageError(f"--round_to must be at least 1, got {multiple}")
    return multiple, ""
  from graph_prune.bench import runners  # pylint: disable=g-import-not-at-top
  kind = device.split(":")[0] if device not in ("", "auto") else runners.resolve_device(
      "auto", "tensorflow").kind
  return auto_round_to(kind, Cache(cache or default_cache()), xla=xla)
