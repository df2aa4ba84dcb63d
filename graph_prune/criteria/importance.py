"""Importance of each unit of each group, from the model's constants or, for the
calibrated criteria, from its activations on calibration samples.

Per-channel scores are computed for every producer (source) of a group and
averaged over the producers that feed the unit, so residual stages weigh all
their convolutions. A low score means "remove first".

Calibrated criteria (their statistics come from calibration.activations):
  activation  mean |activation| of the channel where the next layers read it
  apoz        1 - the fraction of zeros there (Average Percentage Of Zeros: a
              channel that a ReLU zeroes most of the time goes first)
  wanda       per output channel of a producer: sum of |weight| x the L2 norm
              of the input channel it reads (Sun et al., made structured)
  taylor      first-order Taylor estimate of the loss change when a filter is
              zeroed (recover/taylor.py computes it: TensorFlow, gradients)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import numpy as np

from graph_prune import errors
from graph_prune.analysis import groups as groups_lib
from graph_prune.ops import channels as base
from graph_prune.ops import desc
from graph_prune.ops import geometry

CALIBRATED = ("activation", "apoz", "wanda", "taylor")
CRITERIA = ("l1", "l2", "bn_scale", "fpgm", "random") + CALIBRATED


@dataclasses.dataclass(frozen=True)
class Scores:
  per_group: Mapping[int, np.ndarray]   # group id -> one score per unit
  used: Mapping[int, str]               # group id -> criterion actually used


_CHUNK_BYTES = 64 << 20


def _row_norms(weight: np.ndarray, axis: int, order: int) -> np.ndarray:
  """L1 or L2 norm of each output channel's filter, computed over blocks of
  channels so that a large weight is never copied whole. Sums run in the
  weight's own precision (numpy's pairwise summation keeps float32 accurate
  to ~1e-7 relative, ample for ranking) at SIMD speed."""
  weight = np.asarray(weight)
  n = weight.shape[axis]
  others = tuple(a for a in range(weight.ndim) if a != axis)
  step = max(1, int(_CHUNK_BYTES // max(1, weight.nbytes // max(n, 1))))
  out = np.empty(n)
  for start in range(0, n, step):
    block = weight if step >= n else np.take(weight, np.arange(start, min(n, start + step)),
                                             axis=axis)
    if order == 1:
      out[start:start + step] = np.abs(block).sum(axis=others)
    else:
      out[start:start + step] = np.sqrt(np.square(block).sum(axis=others))
  return out


def _filters(weight: np.ndarray, axis: int) -> np.ndarray:
  """One row per output channel (float32: fpgm's Gram matrix is the only user)."""
  w = np.moveaxis(np.asarray(weight, dtype=np.float32), axis, 0)
  return w.reshape(w.shape[0], -1)


def _fpgm(rows: np.ndarray) -> np.ndarray:
  """Sum of distances to all other filters: small means near the geometric median."""
  sq = np.einsum("ij,ij->i", rows, rows, dtype=np.float64)
  gram = (rows @ rows.T).astype(np.float64)
  d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * gram, 0.0)
  return np.sqrt(d2).sum(axis=1)


def calibration_tensors(analysis: groups_lib.Analysis, criterion: str,
                        ops: desc.Registry) -> dict[str, int]:
  """The tensors (name -> channel axis) whose statistics a calibrated criterion
  reads: where the next layers read a group's channels (activation, apoz), or
  the inputs of the producers (wanda)."""
  graph = analysis.graph
  out: dict[str, int] = {}
  if criterion == "taylor":
    return out
  if criterion == "wanda":
    for src in analysis.sources:
      node = graph.node(src.node)
      lin = ops.linear(graph, node)
      if lin is not None and not lin.transposed and node.inputs[0] not in graph.constants:
        out[node.inputs[0]] = lin.channel_axis % (graph.rank(node.inputs[0]) or 1)
    return out
  for sl in analysis.slices:
    if sl.role == base.SINK and sl.by in analysis.dims and sl.by not in graph.constants:
      rank = graph.rank(sl.by)
      if rank:
        out[sl.by] = analysis.dims[sl.by].axis % rank
  return out


def _wanda(analysis: groups_lib.Analysis, src: groups_lib.Source, ops: desc.Registry,
           stats: Mapping[str, Any]) -> Optional[np.ndarray]:
  """Sum over a producer's filter of |weight| x its input channel's L2 norm."""
  graph = analysis.graph
  node = graph.node(src.node)
  lin = ops.linear(graph, node)
  st = stats.get(node.inputs[0]) if lin is not None else None
  if st is None or st.sq_sum is None:
    return None
  layer = geometry.Layer(lin, tuple(graph.constants[lin.weight].shape))
  if geometry.supported(layer):
    return None
  norms = st.norm
  if len(norms) != layer.groups * layer.fan_in:
    return None
  m = np.abs(geometry.matrix(np.asarray(graph.constants[lin.weight], np.float64), layer))
  per_feature = np.tile(norms.reshape(layer.groups, layer.fan_in),
                        (1, m.shape[1] // layer.fan_in))                 # [G, F]
  return np.einsum("gf,gfo->go", per_feature, m).reshape(-1)


def _element_scores(analysis: groups_lib.Analysis, criterion: str,
                    stats: Optional[Mapping[str, Any]] = None,
                    ops: Optional[desc.Registry] = None) -> np.ndarray:
  """Score per element (NaN where no producer, scale or statistic says anything)."""
  n = len(analysis.element_group)
  total = np.zeros(n)
  count = np.zeros(n)
  consts = analysis.graph.constants
  if criterion in ("activation", "apoz"):
    for tensor, st in (stats or {}).items():
      if tensor not in analysis.dims or st.abs_sum is None:
        continue
      units = analysis.dims[tensor].units
      vals = st.mean_abs if criterion == "activation" else 1.0 - st.zero_fraction
      if len(vals) != len(units):
        continue
      np.add.at(total, units, vals)
      np.add.at(count, units, 1)
  elif criterion in ("taylor", "wanda"):
    for src in analysis.sources:
      vals = ((stats or {}).get(src.weight) if criterion == "taylor"
              else _wanda(analysis, src, ops, stats or {}))
      if vals is not None and len(vals) == len(src.elements):
        total[src.elements] += vals
        count[src.elements] += 1
  elif criterion == "bn_scale":
    for sl in analysis.slices:
      if sl.role != base.SCALE or sl.by not in analysis.dims:
        continue
      vals = np.abs(np.asarray(consts[sl.const], dtype=np.float64))
      vals = np.moveaxis(vals, sl.axis, 0).reshape(vals.shape[sl.axis], -1).mean(axis=1)
      np.add.at(total, analysis.dims[sl.by].units, vals)
      np.add.at(count, analysis.dims[sl.by].units, 1)
  else:
    for src in analysis.sources:
      weight = consts[src.weight]
      if criterion == "fpgm":
        vals = _fpgm(_filters(weight, src.weight_axis))
      else:
        vals = _row_norms(weight, src.weight_axis, 1 if criterion == "l1" else 2)
      total[src.elements] += vals
      count[src.elements] += 1
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _per_unit(analysis, element_scores) -> dict[int, np.ndarray]:
  """Mean element score of every unit of every group, in one pass over the elements."""
  offsets = np.zeros(len(analysis.groups) + 1, dtype=np.int64)
  offsets[1:] = np.cumsum([g.channels for g in analysis.groups])
  ok = (analysis.element_group >= 0) & ~np.isnan(element_scores)
  flat = offsets[analysis.element_group[ok]] + analysis.element_unit[ok]
  total = np.bincount(flat, weights=element_scores[ok], minlength=offsets[-1])
  count = np.bincount(flat, minlength=offsets[-1])
  with np.errstate(invalid="ignore", divide="ignore"):
    mean = np.where(count > 0, total / np.maximum(count, 1), np.nan)
  return {g.id: mean[offsets[g.id]:offsets[g.id + 1]] for g in analysis.groups}


def score(analysis: groups_lib.Analysis, criterion: str, seed: int = 0,
          stats: Optional[Mapping[str, Any]] = None,
          ops: Optional[desc.Registry] = None) -> Scores:
  """Scores of every prunable group. The calibrated criteria read `stats` (tensor ->
  calibration.activations.ChannelStats of the tensors calibration_tensors names;
  for taylor, source weight constant -> one score per filter) and `ops`; a group
  they say nothing about is ranked by L1 norm."""
  if criterion in CALIBRATED and (stats is None or ops is None):
    raise errors.UsageError(f"--criterion={criterion} needs calibration samples "
                            "(--calibration_data)")
  if criterion not in CRITERIA:
    raise errors.UsageError(f"unknown criterion '{criterion}'; choose one of "
                            f"{', '.join(CRITERIA)}")
  prunable = [g for g in analysis.groups if g.prunable]
  per_group, used = {}, {}
  if criterion == "random":
    rng = np.random.default_rng(seed)
    for g in prunable:
      per_group[g.id], used[g.id] = rng.random(g.channels), "random"
    return Scores(per_group, used)
  units = _per_unit(analysis, _element_scores(analysis, criterion, stats, ops))
  fallback = None
  for g in prunable:
    if np.isnan(units[g.id]).any():
      # bn_scale on a group without batch-norm, a calibrated criterion on one it
      # has no statistics for: rank by filter L1 norm instead.
      if fallback is None:
        fallback = _per_unit(analysis, _element_scores(analysis, "l1"))
      per_group[g.id], used[g.id] = fallback[g.id], "l1"
    else:
      per_group[g.id], used[g.id] = units[g.id], criterion
  return Scores(per_group, used)
