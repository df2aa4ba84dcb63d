"""Non-linear (codebook) weights: per layer, 1-D k-means on the weight's values.

The k centroids (k = 2^bits) start evenly spaced between the smallest and the
largest value -- the linear initialisation, which Deep Compression (Han et al.,
2016) found best because it keeps the rare large weights that matter most --
and follow Lloyd's iterations (assign each value to the nearest centroid, move
each centroid to the mean of its values) until no assignment changes or the
iteration limit. A weight with at most k distinct values is stored exactly.

With calibration data (`fit_outputs`, the default for --quantize=codebook*),
the codebook is fitted to the layer's outputs instead of its weight values: with
H = P^T P the Gram matrix of the layer's input rows (fed by the model with the
layers before it already quantized) and W* the ridge least-squares weight that
gives the float model's output there, the error |P Q - P W*|^2 =
tr((Q - W*)^T H (Q - W*)) is what is minimised. Starting from the k-means table
of W*, rounds of (1) assignment with error feedback, input feature by input
feature in order, each feature's rounding error spread over the features not
yet assigned through the inverse of H (GPTQ, Frantar et al., 2023, with the
codebook as the grid), and (2) the centroids re-solved in closed form for those
assignments (the error is quadratic in the k centroids); the table with the
smallest error wins, the plain k-means one included, so the fit is never worse
on the calibration rows than k-means. The layer's intercept (its bias or the
shift after it) takes the mean residual.

4-bit indices are packed two to a byte: element 2i in the low nibble, 2i+1 in
the high one.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Table:
  """One weight as a codebook: weight == codebook[indices].reshape(shape)."""
  codebook: np.ndarray     # float, the weight's dtype, at most 2^bits entries
  indices: np.ndarray      # uint8, one per element (flattened)
  shape: tuple[int, ...]
  bits: int
  iterations: int          # Lloyd iterations run

  def weight(self) -> np.ndarray:
    return self.codebook[self.indices].reshape(self.shape)

  def stored(self, packed: bool) -> np.ndarray:
    """The indices as written: packed two to a byte (4 bits, `packed`), else one
    uint8 per element in the weight's shape."""
    return pack4(self.indices) if packed and self.bits == 4 else self.indices.reshape(self.shape)


def fit(weight: np.ndarray, bits: int, iterations: int = 50) -> Table:
  """k-means (k = 2^bits) of the weight's values; deterministic."""
  if bits not in (4, 8):
    raise ValueError(f"codebook bits must be 4 or 8, not {bits}")
  values = np.asarray(weight).reshape(-1)
  k = 1 << bits
  distinct = np.unique(values)
  if len(distinct) <= k:
    return Table(distinct.astype(weight.dtype), np.searchsorted(distinct, values).astype(np.uint8),
                 tuple(weight.shape), bits, 0)
  x = values.astype(np.float64)
  centroids = np.linspace(x.min(), x.max(), k)
  assign = None
  done = 0
  for done in range(1, iterations + 1):
    # The nearest centroid of a sorted codebook: the midpoints split the line.
    new = np.searchsorted((centroids[1:] + centroids[:-1]) / 2, x)
    if assign is not None and np.array_equal(new, assign):
      break
    assign = new
    counts = np.bincount(assign, minlength=k)
    sums = np.bincount(assign, weights=x, minlength=k)
    filled = counts > 0
    centroids[filled] = sums[filled] / counts[filled]   # an empty cluster keeps its place
    centroids = np.sort(centroids)
  assign = np.searchsorted((centroids[1:] + centroids[:-1]) / 2, x)
  return Table(centroids.astype(weight.dtype), assign.astype(np.uint8), tuple(weight.shape),
               bits, done)


def pack4(indices: np.ndarray) -> np.ndarray:
  """Two 4-bit indices per byte (low nibble first); odd lengths padded with 0."""
  flat = np.asarray(indices, np.uint8).reshape(-1)
  if len(flat) % 2:
    flat = np.concatenate([flat, np.zeros(1, np.uint8)])
  return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8)


def unpack4(packed: np.ndarray, count: int) -> np.ndarray:
  """The inverse of pack4 (what the graph computes at load)."""
  p = np.asarray(packed, np.uint8)
  return np.stack([p & 15, p >> 4], axis=1).reshape(-1)[:count]


def rel_error(weight: np.ndarray, table: Table) -> float:
  """Root of the summed squared error over the weight's summed squares."""
  w = np.asarray(weight, np.float64)
  ref = float(np.sum(np.square(w)))
  err = float(np.sum(np.square(table.weight().astype(np.float64) - w)))
  return float(np.sqrt(err / ref)) if ref > 0 else 0.0


@dataclasses.dataclass(frozen=True)
class OutputFit:
  """A codebook fitted to a layer's outputs, in the layer's matrix layout."""
  codebook: np.ndarray        # [k] float64, sorted
  assign: np.ndarray          # [G, F, O] indices into the codebook
  error_kmeans: float         # relative output error of the k-means table of W*
  error: float                # ... of this table
  rounds: int                 # rounds of assignment and centroid solve run


def _nearest(codebook: np.ndarray, values: np.ndarray) -> np.ndarray:
  return np.searchsorted((codebook[1:] + codebook[:-1]) / 2, values)


def _output_error(q: np.ndarray, w: np.ndarray, h: np.ndarray) -> float:
  d = q - w
  return float(np.einsum("gfo,gfh,gho->", d, h, d))


def _feedback_assign(w: np.ndarray, h: np.ndarray, codebook: np.ndarray) -> np.ndarray:
  """GPTQ with the codebook as the grid: feature by feature, the nearest centroid,
  the rounding error spread over the later features through the Cholesky factor
  of H^-1."""
  g, f, _ = w.shape
  out = np.empty(w.shape, np.int64)
  for gi in range(g):
    hinv = np.linalg.inv(h[gi])
    try:
      u = np.linalg.cholesky(hinv).T             # upper: H^-1 = U^T U
    except np.linalg.LinAlgError:
      out[gi] = _nearest(codebook, w[gi])
      continue
    rest = w[gi].copy()
    for i in range(f):
      a = _nearest(codebook, rest[i])
      out[gi, i] = a
      err = (rest[i] - codebook[a]) / u[i, i]
      rest[i + 1:] -= np.outer(u[i, i + 1:], err)
  return out


def _solve_centroids(w: np.ndarray, h: np.ndarray, assign: np.ndarray,
                     codebook: np.ndarray) -> np.ndarray:
  """The centroids minimising tr((Q - W)^T H (Q - W)) for Q = codebook[assign]:
  A c = b with A_kl = sum over groups and outputs of e_k^T H e_l (e_k: where the
  output's column uses centroid k), b_k = sum of e_k^T H W. Unused centroids
  keep their values."""
  k = len(codebook)
  a_mat = np.zeros(k * k)
  b = np.zeros(k)
  g, f, o = w.shape
  chunk = max(1, (1 << 22) // max(f * f, 1))
  for gi in range(g):
    b += np.bincount(assign[gi].ravel(), weights=(h[gi] @ w[gi]).ravel(), minlength=k)
    for start in range(0, o, chunk):
      a = assign[gi][:, start:start + chunk]                       # [F, oc]
      pair = a[:, None, :] * k + a[None, :, :]                     # [F, F, oc]
      weights = np.broadcast_to(h[gi][:, :, None], pair.shape)
      a_mat += np.bincount(pair.ravel(), weights=weights.ravel(), minlength=k * k)
  a_mat = a_mat.reshape(k, k)
  used = np.diag(a_mat) > 0
  out = codebook.copy()
  if used.any():
    sub = a_mat[np.ix_(used, used)]
    rhs = b[used] - a_mat[np.ix_(used, ~used)] @ codebook[~used]
    out[used] = np.linalg.lstsq(sub, rhs, rcond=None)[0]
  return out


def _sorted(codebook: np.ndarray, assign: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  order = np.argsort(codebook, kind="stable")
  rank = np.empty_like(order)
  rank[order] = np.arange(len(order))
  return codebook[order], rank[assign]


def fit_outputs(w: np.ndarray, h: np.ndarray, bits: int, rounds: int = 4,
                iterations: int = 50) -> OutputFit:
  """The codebook table of weight matrix w [G, F, O] whose outputs are closest
  to w's on the rows whose (damped, positive definite) Gram matrix is h
  [G, F, F]; deterministic."""
  w = np.asarray(w, np.float64)
  h = np.asarray(h, np.float64)
  start = fit(w, bits, iterations)
  codebook = start.codebook.astype(np.float64)
  assign = start.indices.reshape(w.shape).astype(np.int64)
  ref = max(float(np.einsum("gfo,gfh,gho->", w, h, w)), 1e-30)
  best = (_output_error(codebook[assign], w, h), codebook, assign)
  base = best[0]
  done = 0
  for done in range(1, rounds + 1):
    assign = _feedback_assign(w, h, codebook)
    codebook, assign = _sorted(_solve_centroids(w, h, assign, codebook), assign)
    err = _output_error(codebook[assign], w, h)
    if err < best[0] * (1 - 1e-9):
      best = (err, codebook, assign)
    else:
      break
  return OutputFit(best[1], best[2], float(np.sqrt(base / ref)), float(np.sqrt(best[0] / ref)),
                   done)
