"""Measured latency of candidate models beside their original, for the latency
budgets of pruning (--target_speedup, --target_latency_ms).

Each candidate runs against the original in the one timing loop
(bench/timing.py: one call of each per round, the order shuffled by a seed) on
the device and batch size asked for, with the same runtime as //tools:bench (XLA
or plain TensorFlow, ONNX Runtime); the speedup is the median of the per-round
latency ratios, the latency the median of the candidate's times. The pipeline is
handed a Probe (pipeline.Options.latency), so pruning itself imports no runtime.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from graph_prune import heap
from graph_prune.bench import runners
from graph_prune.bench import timing


@dataclasses.dataclass(frozen=True)
class Measured:
  speedup: float            # median of original / candidate over the rounds
  speedup_p10: float
  speedup_p90: float
  latency_ms: float         # the candidate's median
  original_ms: float        # the original's median in the same rounds


@dataclasses.dataclass(frozen=True)
class Probe:
  """Where and how candidates are timed."""
  device: str = "auto"
  xla: bool = True
  batch: int = 1
  settings: timing.Settings = timing.Settings(max_seconds=3.0, target_rse=0.01)
  seed: int = 0
  cache: Optional[str] = None   # the per-layer latency table (default: the user cache)
  # A TensorFlow original with at least this many bytes has its weights (and its
  # candidates theirs) fed as arguments, not compiled in as constants: XLA keeps
  # every executable it compiled, and a budget's dozen candidates of VGG16 at
  # 224x224 held 16 GB that way. None: never.
  feed_weights_bytes: Optional[int] = 64 << 20

  def describe(self) -> dict[str, Any]:
    return {"device_requested": self.device, "xla": self.xla, "batch": self.batch,
            "max_seconds": self.settings.max_seconds, "target_rse": self.settings.target_rse}

  def profile(self, graph, ops, fmt: str):
    """Every linear layer of the view timed across its widths on this device
    (bench/layer_latency.py; cached): the latency model of --allocation=latency."""
    from graph_prune.bench import layer_latency  # pylint: disable=g-import-not-at-top
    return layer_latency.profile(graph, ops, fmt, self.device, self.xla, self.batch,
                                 self.cache)

  def session(self, model: Any) -> "Session":
    """Times candidates against `model` (a loaded TensorFlow or ONNX model)."""
    return Session(self, model)


def _loaded(model: Any) -> runners.Loaded:
  kind = getattr(model, "kind", None)
  return runners.Loaded("", kind if kind else runners.ONNX, model)


class Session:
  """The original, built and bound once; candidates one at a time."""

  def __init__(self, probe: Probe, model: Any):
    self._probe = probe
    loaded = _loaded(model)
    self._device = runners.resolve_device(probe.device, loaded.format)
    runners.init_runtime(loaded.format, self._device)
    self.feed_weights = (probe.feed_weights_bytes is not None
                         and loaded.format not in (runners.ONNX, runners.TFLITE)
                         and model.graph_def.ByteSize() >= probe.feed_weights_bytes)
    self._original = runners.build(loaded, self._device, probe.xla, self.feed_weights).bind(
        probe.batch, probe.seed)
    self.device_label = runners.describe(self._device, loaded.format)
    self.measured = 0

  def measure(self, candidate: Any) -> Measured:
    bound = runners.build(_loaded(candidate), self._device, self._probe.xla,
                          self.feed_weights).bind(self._probe.batch, self._probe.seed)
    settings = dataclasses.replace(self._probe.settings, seed=self._probe.seed + self.measured)
    result = timing.measure([self._original.call, bound.call], settings)
    # A built candidate (its function, graph and bound inputs) is held by reference
    # cycles until the collector runs: a budget's dozen candidates of a large model
    # would otherwise add up (VGG16 at 224x224 ran out of 24 GB).
    del bound
    heap.give_back(heap.WORTH_BYTES)
    self.measured += 1
    s = timing.speedup(result)
    return Measured(s.median, s.p10, s.p90, 1e3 * timing.summarise(result.times[1]).median,
                    1e3 * timing.summarise(result.times[0]).median)


def check(probe: Optional[Probe]) -> None:
  if probe is not None:
    runners.check_device(probe.device)
