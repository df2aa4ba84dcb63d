"""A linear layer as a matrix product, for reconstruction.

Every output of a convolution or dense layer is a dot product of one row of
inputs (its kernel window over its group's input channels) with one column of
the weight. `rows` extracts those rows from an activation (im2col, for 1-D to
3-D convolutions with strides, dilations and any padding; the rows of a dense
layer's input as they are), `matrix` brings the weight to the matching
[group, features, outputs] form and `weight` back. What the layer is (axes,
kernel, padding, groups) comes from its op description (desc.Linear); the
reconstruction checks the product against the layer's real output before it
trusts it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import numpy as np
from numpy.lib import stride_tricks

from graph_prune.ops import desc


@dataclasses.dataclass(frozen=True)
class Layer:
  """One linear layer of one model: its description and weight shape."""
  lin: desc.Linear
  weight_shape: tuple[int, ...]

  @property
  def spatial(self) -> int:
    return len(self.lin.kernel)

  @property
  def outputs(self) -> int:
    shape = self.weight_shape
    if self.lin.multiplier_axis is not None:
      return shape[self.lin.out_axis] * shape[self.lin.multiplier_axis]
    return shape[self.lin.out_axis]

  @property
  def groups(self) -> int:
    return self.lin.groups

  @property
  def fan_in(self) -> int:
    """Input channels per group."""
    return 1 if self.lin.multiplier_axis is not None else self.weight_shape[self.lin.in_axis]

  @property
  def features(self) -> int:
    """Inputs of one output: kernel window x the group's input channels."""
    return math.prod(self.lin.kernel) * self.fan_in


def supported(layer: Layer) -> Optional[str]:
  """Why the layer cannot be written as rows x matrix, or None."""
  lin = layer.lin
  if lin.transposed:
    return "a transposed convolution spreads each input over many outputs"
  if not lin.kernel and lin.channel_axis not in (-1, len(layer.weight_shape) - 1):
    return "its input's channels are not on the last axis"
  if lin.alpha != 1.0 or lin.beta != 1.0:
    return "alpha or beta is not 1"
  if layer.outputs % layer.groups or layer.fan_in < 1:
    return f"{layer.outputs} outputs for {layer.groups} groups"
  if lin.padding not in ("VALID", "SAME_UPPER", "SAME_LOWER", "EXPLICIT"):
    return f"padding {lin.padding}"
  return None


def matrix(w: np.ndarray, layer: Layer) -> np.ndarray:
  """The weight as [groups, features, outputs per group]: features in (kernel...,
  input channel) order, as `rows` gives them."""
  lin = layer.lin
  if lin.multiplier_axis is not None:   # [..., C, M]: output c*M + m reads channel c
    w = np.moveaxis(w, (lin.out_axis, lin.multiplier_axis), (-2, -1))
    w = w.reshape(w.shape[:-2] + (1, w.shape[-2] * w.shape[-1]))
  else:
    w = np.moveaxis(w, (lin.in_axis, lin.out_axis), (-2, -1))
  g = layer.groups
  per = w.shape[-1] // g
  w = w.reshape(w.shape[:-1] + (g, per))                 # [*k, cin, G, O]
  w = np.moveaxis(w, -2, 0)                               # [G, *k, cin, O]
  return w.reshape(g, -1, per)


def weight(m: np.ndarray, layer: Layer, dtype) -> np.ndarray:
  """The inverse of `matrix`: the weight in the layer's own layout."""
  lin, shape = layer.lin, layer.weight_shape
  g, _, per = m.shape
  kernel = tuple(lin.kernel)
  w = m.reshape((g,) + kernel + (layer.fan_in, per))
  w = np.moveaxis(w, 0, -2).reshape(kernel + (layer.fan_in, g * per))   # [*k, cin, out]
  if lin.multiplier_axis is not None:
    c, mult = shape[lin.out_axis], shape[lin.multiplier_axis]
    w = np.moveaxis(w.reshape(kernel + (c, mult)), (-2, -1),
                    (lin.out_axis, lin.multiplier_axis))
  else:
    w = np.moveaxis(w, (-2, -1), (lin.in_axis, lin.out_axis))
  assert w.shape == tuple(shape), (w.shape, shape)
  return np.ascontiguousarray(w.astype(dtype))


def _pads(layer: Layer, size: tuple[int, ...]) -> list[tuple[int, int]]:
  lin = layer.lin
  dil = lin.dilations or (1,) * layer.spatial
  strides = lin.strides or (1,) * layer.spatial
  if lin.padding == "EXPLICIT":
    return list(lin.pads) or [(0, 0)] * layer.spatial
  if lin.padding == "VALID":
    return [(0, 0)] * layer.spatial
  out = []
  for n, k, s, d in zip(size, lin.kernel, strides, dil):
    total = max((-(-n // s) - 1) * s + (k - 1) * d + 1 - n, 0)
    small = total // 2
    out.append((small, total - small) if lin.padding == "SAME_UPPER" else (total - small, small))
  return out


def identity(layer: Layer, size: tuple[int, ...]) -> Optional[np.ndarray]:
  """The weight (in the layer's layout) that makes the layer copy its input to its
  output, for an input of spatial extent `size`: each output channel reads its own
  input channel at the one kernel tap that lands on the output's own position. None
  where no weight does (strides, a tap between pixels, outputs that are not one per
  input channel of their group)."""
  lin = layer.lin
  if supported(layer) is not None or layer.outputs // layer.groups != layer.fan_in:
    return None
  if any(s != 1 for s in lin.strides):
    return None
  taps = []
  dil = lin.dilations or (1,) * layer.spatial
  for (begin, _), k, d in zip(_pads(layer, size), lin.kernel, dil):
    if begin % d or not 0 <= begin // d < k:
      return None
    taps.append(begin // d)
  tap = int(np.ravel_multi_index(tuple(taps), tuple(lin.kernel))) if taps else 0
  per = layer.fan_in
  m = np.zeros((layer.groups, layer.features, per), np.float64)
  m[:, tap * per + np.arange(per), np.arange(per)] = 1.0
  return weight(m, layer, np.float64)


def output_positions(layer: Layer, x_shape: tuple[int, ...]) -> tuple[int, ...]:
  """Output positions per sample (spatial extent; () for a dense layer)."""
  lin = layer.lin
  if not lin.kernel:
    return tuple(x_shape[1:-1])
  first = lin.channel_axis in (1,)
  size = tuple(x_shape[2:] if first else x_shape[1:-1])
  dil = lin.dilations or (1,) * layer.spatial
  strides = lin.strides or (1,) * layer.spatial
  return tuple((n + b + e - ((k - 1) * d + 1)) // s + 1
               for n, (b, e), k, s, d in zip(size, _pads(layer, size), lin.kernel, strides, dil))


def rows(x: np.ndarray, layer: Layer, picks: Optional[np.ndarray] = None) -> np.ndarray:
  """[R, groups, features] float32: the inputs of every output position of every
  sample (row r = sample-major, then positions in order), or of the rows `picks`
  (flat indices into that order) only."""
  lin = layer.lin
  x = np.asarray(x, dtype=np.float32)
  if not lin.kernel:
    flat = x.reshape(-1, x.shape[-1])
    if picks is not None:
      flat = flat[picks]
    return flat.reshape(len(flat), layer.groups, -1)
  first = lin.channel_axis == 1
  xl = np.moveaxis(x, 1, -1) if first else x             # [N, *S, C]
  size = xl.shape[1:-1]
  pads = _pads(layer, size)
  xp = np.pad(xl, [(0, 0)] + list(pads) + [(0, 0)])
  dil = lin.dilations or (1,) * layer.spatial
  strides = lin.strides or (1,) * layer.spatial
  extent = tuple((k - 1) * d + 1 for k, d in zip(lin.kernel, dil))
  axes = tuple(range(1, 1 + layer.spatial))
  win = stride_tricks.sliding_window_view(xp, extent, axis=axes)   # [N, *S', C, *extent]
  win = win[(slice(None),) + tuple(slice(None, None, s) for s in strides) + (slice(None),)
            + tuple(slice(None, None, d) for d in dil)]
  out = output_positions(layer, x.shape)
  win = win[(slice(None),) + tuple(slice(0, o) for o in out)]
  if picks is None:
    r = np.ascontiguousarray(win).reshape((-1,) + win.shape[1 + layer.spatial:])
  else:
    index = np.unravel_index(picks, (xl.shape[0],) + out)
    r = win[index]                                          # [R, C, *k]
  r = r.reshape((len(r), layer.groups, layer.fan_in) + tuple(lin.kernel))
  r = np.moveaxis(r, 2, -1)                                 # [R, G, *k, cin]
  return r.reshape(len(r), layer.groups, -1)


def outputs(z: np.ndarray, layer: Layer, picks: Optional[np.ndarray] = None) -> np.ndarray:
  """[R, groups, outputs per group]: a layer output as rows, in `rows`' order."""
  axis = layer.lin.channel_axis
  z = np.moveaxis(np.asarray(z), axis, -1) if axis not in (-1, z.ndim - 1) else np.asarray(z)
  flat = z.reshape(-1, z.shape[-1])
  if picks is not None:
    flat = flat[picks]
  return flat.reshape(len(flat), layer.groups, -1)
