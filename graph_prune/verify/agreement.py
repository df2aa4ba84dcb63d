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



def outputs(make: Callable[[], object], x: np.ndarray, batch_size: int,
            fixed: Optional[int]) -> np.ndarray:
  """The model's outputs on x, each flattened per sample and side by side:
  [samples, values]. The runner `make` opens is closed again."""
  run = make()
  try:
    rows = [np.concatenate([np.asarray(o, np.float64).reshape(len(chunk), -1) for o in outs],
                           axis=1)
            for chunk, outs in activations.batches(run, x, batch_size, fixed)]
  finally:
    run.close()
  return np.concatenate(rows)


def probe_error(ref_fit: np.ndarray, got_fit: np.ndarray, ref_held: np.ndarray,
                got_held: np.ndarray, ridge: float = 1e-6) -> float:
  """How much of the reference's outputs a model's outputs no longer carry: the best
  affine map from got to ref is fitted on the fit rows (least squares on centred
  values, a ridge of `ridge` times the mean diagonal), and its residual on the
  held-out rows is given relative to the held-out reference's spread (1 - R^2, by
  root: 0 when the reference is an affine function of the outputs, about 1 when
  nothing of it is left). A model that computes the same thing up to a scale and
  shift scores 0 where its raw relative error would not."""
  mean_got, mean_ref = got_fit.mean(axis=0), ref_fit.mean(axis=0)
  a = got_fit - mean_got
  gram = a.T @ a
  gram[np.diag_indices_from(gram)] += ridge * max(float(np.trace(gram)) / len(gram), 1e-30)
  w = np.linalg.solve(gram, a.T @ (ref_fit - mean_ref))
  pred = (got_held - mean_got) @ w + mean_ref
  spread = float(np.sum(np.square(ref_held - ref_held.mean(axis=0))))
  return math.sqrt(float(np.sum(np.square(pred - ref_held))) / spread) if spread > 0 else 0.0
