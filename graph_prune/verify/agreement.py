"""How closely a model's outputs follow a reference's on the same inputs: top-1
agreement (first output, when it scores classes), relative error over all outputs
and the largest relative difference, accumulated over batches.

Where the oracle proves equality, this measures a change that cannot be exact
(reconstruction, quantization) on held-out samples.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import numpy as np

from graph_prune.calibration import activations
from graph_prune.verify import oracle


class Agreement:
  """Accumulates batches of (reference outputs, outputs); `doc()` gives the figures."""

  def __init__(self):
    self.same = self.count = 0
    self.err = self.ref = 0.0
    self.max_rel = 0.0

  def add(self, ref: list, got: list) -> None:
    first_r, first_g = np.asarray(ref[0]), np.asarray(got[0])
    if first_r.ndim == 2 and first_r.shape[1] > 1:
      self.same += int(np.sum(np.argmax(first_r, 1) == np.argmax(first_g, 1)))
      self.count += len(first_r)
    for r, g in zip(ref, got):
      r64, g64 = np.asarray(r, np.float64), np.asarray(g, np.float64)
      self.err += float(np.sum(np.square(g64 - r64)))
      self.ref += float(np.sum(np.square(r64)))
    self.max_rel = max(self.max_rel, oracle.max_diff(ref, got)[1])

  def doc(self) -> dict:
    """agreement (None when the first output does not score classes), rel_error
    (root of the summed squared differences over the reference's), max_rel_diff."""
    return {"agreement": self.same / self.count if self.count else None,
            "rel_error": math.sqrt(self.err / self.ref) if self.ref > 0 else 0.0,
            "max_rel_diff": self.max_rel}


def against_first(makers: Sequence[Callable[[], object]], x: np.ndarray, batch_size: int,
                  fixed: Optional[int]) -> list[dict]:
  """Runs the models that `makers` open (runners of calibration.activations) on x in
  batches, and returns each later model's Agreement doc against the first; every
  runner is closed again."""
  runners = []
  try:
    for make in makers:
      runners.append(make())
    accs = [Agreement() for _ in runners[1:]]
    streams = [activations.batches(r, x, batch_size, fixed) for r in runners]
    for outs in zip(*streams):
      for acc, (_, got) in zip(accs, outs[1:]):
        acc.add(outs[0][1], got)
  finally:
    for r in runners:
      r.close()
  return [a.doc() for a in accs]

