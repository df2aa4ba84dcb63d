"""Activations of a model on calibration samples, through its format's runner.

`batches` feeds the samples in batches (padding the last one for a model whose
batch dimension is fixed, and dropping the padding's outputs); `channel_stats`
keeps per-channel statistics of chosen tensors over all batches, never the
activations themselves.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Mapping, Optional, Sequence

import numpy as np

from graph_prune import errors


def runner(adapter, model, extra: Sequence[str], arrays=None):
  """A runner for many batches: where the adapter runs a graph with its weights fed
  (TensorFlow), without a graph optimiser and with the weights taken from
  `arrays` (no copy of them); otherwise (ONNX Runtime) with the runtime's full
  optimisation, which fetching intermediate tensors leaves correct."""
  if getattr(adapter, "RUNS_WITH_WEIGHTS", False):
    return adapter.Runner(model, extra, optimize=False, arrays=arrays)
  return adapter.Runner(model, extra)


def fixed_batch(graph) -> Optional[int]:
  """The batch size the model's input insists on, or None."""
  shape = graph.shape(graph.inputs[0])
  return shape[0] if shape and shape[0] else None


def batches(runner, x: np.ndarray, size: int, fixed: Optional[int] = None
            ) -> Iterator[tuple[np.ndarray, list[np.ndarray]]]:
  """(samples, outputs) per batch of at most `size` samples (exactly `fixed`, padded
  with zeros, when the model's batch dimension is fixed)."""
  step = fixed or size
  for start in range(0, len(x), step):
    chunk = x[start:start + step]
    pad = step - len(chunk) if fixed else 0
    fed = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)]) if pad else chunk
    try:
      outs = runner([fed])
    except errors.RunError as e:
      raise errors.InputError(f"the model does not run on the calibration samples: {e}") from None
    yield chunk, [np.asarray(o)[:len(chunk)] for o in outs]


@dataclasses.dataclass
class ChannelStats:
  """Per-channel sums over all positions of all samples (float64)."""
  count: float = 0.0
  abs_sum: Optional[np.ndarray] = None
  sq_sum: Optional[np.ndarray] = None
  zeros: Optional[np.ndarray] = None

  def add(self, value: np.ndarray, axis: int) -> None:
    v = np.moveaxis(np.asarray(value, np.float64), axis, -1)
    v = v.reshape(-1, v.shape[-1])
    parts = (np.abs(v).sum(axis=0), np.square(v).sum(axis=0), (v == 0).sum(axis=0))
    if self.abs_sum is None:
      self.abs_sum, self.sq_sum, self.zeros = (np.zeros(len(p)) for p in parts)
    self.abs_sum += parts[0]
    self.sq_sum += parts[1]
    self.zeros += parts[2]
    self.count += len(v)

  @property
  def mean_abs(self) -> np.ndarray:
    return self.abs_sum / max(self.count, 1)

  @property
  def zero_fraction(self) -> np.ndarray:
    return self.zeros / max(self.count, 1)

  @property
  def norm(self) -> np.ndarray:
    """L2 norm of each channel over every position of every sample."""
    return np.sqrt(self.sq_sum)


def channel_stats(fmt, model, graph, tensors: Mapping[str, int], x: np.ndarray,
                  batch_size: int = 64) -> dict[str, ChannelStats]:
  """Statistics of each tensor (name -> its channel axis) on the samples, in one pass."""
  names: Sequence[str] = list(tensors)
  stats = {t: ChannelStats() for t in names}
  run = runner(fmt.adapter, model, names, graph.constants)
  try:
    for _, outs in batches(run, x, batch_size, fixed_batch(graph)):
      for t, value in zip(names, outs[len(outs) - len(names):]):
        stats[t].add(value, tensors[t])
  finally:
    run.close()
  return stats
