"""Non-linear (codebook) weights: per layer, 1-D k-means on the weight's values.

The k centroids (k = 2^bits) start evenly spaced between the smallest and the
largest value -- the linear initialisation, which Deep Compression (Han et al.,
2016) found best because it keeps the rare large weights that matter most --
and follow Lloyd's iterations (assign each value to the nearest centroid, move
each centroid to the mean of its values) until no assignment changes or the
iteration limit. A weight with at most k distinct values is stored exactly.

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
