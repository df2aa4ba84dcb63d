"""Ridge least squares for one layer, from Gram matrices accumulated over batches.

For each group g the layer's new weight W and intercept c minimise

  sum over rows |P W + c - Y|^2 + lam * |W - W0|^2

(P the rows of inputs, Y the target outputs, W0 the sliced weight): the ridge
pulls towards the weight the pruning kept, not towards zero, so a layer with few
rows stays close to the plain slice instead of shrinking. Only P^T P, P^T Y, the
sums of P and Y and Y^T Y are kept (float64), never the activations: memory is
features^2 per group, whatever the number of samples.
"""

from __future__ import annotations

import dataclasses
import numpy as np


@dataclasses.dataclass(frozen=True)
class Fit:
  weight: np.ndarray        # [G, F, O]
  intercept: np.ndarray     # [G, O] (zeros without an intercept)
  rel_error_before: float   # |P W0 - Y| / |Y| over the rows
  rel_error_after: float
  rows: int


class Normal:
  """The normal equations of one layer, summed over batches."""

  def __init__(self, groups: int, features: int, outputs: int, intercept: bool):
    self.intercept = intercept
    self.gram = np.zeros((groups, features, features))
    self.cross = np.zeros((groups, features, outputs))
    self.sum_p = np.zeros((groups, features))
    self.sum_y = np.zeros((groups, outputs))
    self.yy = np.zeros(groups)
    self.rows = 0

  def add(self, p: np.ndarray, y: np.ndarray) -> None:
    """p: [R, G, F] rows of inputs; y: [R, G, O] their target outputs."""
    p = np.asarray(p, np.float32)
    y = np.asarray(y, np.float32)
    if p.shape[1] == 1:   # one BLAS product instead of a batched one
      self.gram[0] += (p[:, 0].T @ p[:, 0]).astype(np.float64)
      self.cross[0] += (p[:, 0].T @ y[:, 0]).astype(np.float64)
    else:
      self.gram += np.einsum("rgf,rgh->gfh", p, p, dtype=np.float64)
      self.cross += np.einsum("rgf,rgo->gfo", p, y, dtype=np.float64)
    self.sum_p += p.sum(axis=0, dtype=np.float64)
    self.sum_y += y.sum(axis=0, dtype=np.float64)
    self.yy += np.einsum("rgo,rgo->g", y, y, dtype=np.float64)
    self.rows += len(p)

  def _error(self, w: np.ndarray, c: np.ndarray) -> float:
    """|P W + c - Y|^2 / |Y|^2 over every group, from the sums."""
    n = self.rows
    sq = (np.einsum("gfo,gfh,gho->", w, self.gram, w)
          - 2 * np.einsum("gfo,gfo->", w, self.cross)
          + 2 * np.einsum("go,gf,gfo->", c, self.sum_p, w)
          - 2 * np.einsum("go,go->", c, self.sum_y)
          + n * np.sum(c * c) + np.sum(self.yy))
    return float(np.sqrt(max(sq, 0.0) / max(np.sum(self.yy), 1e-30)))

  def solve(self, prior: np.ndarray, ridge: float) -> Fit:
    """The fit; `prior` [G, F, O] is the sliced weight the ridge pulls towards.
    `ridge` is relative: lam = ridge x the mean diagonal of the group's P^T P."""
    g, _, o = self.cross.shape
    n = self.rows
    prior = np.asarray(prior, np.float64)
    zero = np.zeros((g, o))
    if n == 0:
      return Fit(prior, zero, 0.0, 0.0, 0)
    lhs, rhs = self.system(prior, ridge)
    try:
      if ridge <= 0:
        raise np.linalg.LinAlgError("no ridge: the minimum-norm solution")
      w = np.linalg.solve(lhs, rhs)
    except np.linalg.LinAlgError:
      w = np.stack([np.linalg.lstsq(a, b, rcond=None)[0] for a, b in zip(lhs, rhs)])
    c = self.intercept_for(w)
    return Fit(w, c, self._error(prior, zero), self._error(w, c), n)

  def centred(self) -> tuple[np.ndarray, np.ndarray]:
    """P^T P and P^T Y, centred when the layer has an intercept (which is then the
    mean residual, and the weight fits the covariance)."""
    if not self.intercept or self.rows == 0:
      return self.gram, self.cross
    n = self.rows
    mp, my = self.sum_p / n, self.sum_y / n
    return (self.gram - n * np.einsum("gf,gh->gfh", mp, mp),
            self.cross - n * np.einsum("gf,go->gfo", mp, my))

  def system(self, prior: np.ndarray, ridge: float) -> tuple[np.ndarray, np.ndarray]:
    """(P^T P + lam I, P^T Y + lam prior), centred as `centred` is, with lam per
    group `ridge` x the mean diagonal of its Gram matrix: the fit is lhs^-1 rhs."""
    gram, cross = self.centred()
    scale = np.einsum("gff->g", gram) / gram.shape[-1]
    lam = (ridge * np.where(scale > 0, scale, 1.0))[:, None, None]
    return (gram + lam * np.eye(gram.shape[-1])[np.newaxis],
            cross + lam * np.asarray(prior, np.float64))

  def intercept_for(self, w: np.ndarray) -> np.ndarray:
    """[G, O]: the best intercept for weight w (zeros without an intercept)."""
    if not self.intercept or self.rows == 0:
      return np.zeros(self.cross.shape[::2])
    n = self.rows
    return self.sum_y / n - np.einsum("gf,gfo->go", self.sum_p / n, w)

  def error(self, w: np.ndarray, intercept: bool = True) -> float:
    """|P W + c - Y| / |Y| over the rows, c the best intercept for w (or none)."""
    return self._error(w, self.intercept_for(w) if intercept else np.zeros(self.cross.shape[::2]))


def needed_rows(features: int, intercept: bool) -> int:
  """Rows a unique least-squares fit needs."""
  return features + (1 if intercept else 0)
