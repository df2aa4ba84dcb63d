"""Importance of each unit of each group, from the model's constants.

Per-channel scores are computed for every producer (source) of a group and
averaged over the producers that feed the unit, so residual stages weigh all
their convolutions. A low score means "remove first".
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np

from graph_prune import errors
from graph_prune.analysis import groups as groups_lib
from graph_prune.rules import base

CRITERIA = ("l1", "l2", "bn_scale", "fpgm", "random")


@dataclasses.dataclass(frozen=True)
class Scores:
  per_group: Mapping[int, np.ndarray]   # group id -> one score per unit
  used: Mapping[int, str]               # group id -> criterion actually used


def _filters(weight: np.ndarray, axis: int) -> np.ndarray:
  """One row per output channel."""
  w = np.moveaxis(np.asarray(weight, dtype=np.float64), axis, 0)
  return w.reshape(w.shape[0], -1)


def _fpgm(rows: np.ndarray) -> np.ndarray:
  """Sum of distances to all other filters: small means near the geometric median."""
  sq = np.einsum("ij,ij->i", rows, rows)
  d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * rows @ rows.T, 0.0)
  return np.sqrt(d2).sum(axis=1)


def _element_scores(analysis: groups_lib.Analysis, criterion: str) -> np.ndarray:
  """Score per element (NaN where no producer or scale says anything)."""
  n = len(analysis.element_group)
  total = np.zeros(n)
  count = np.zeros(n)
  consts = analysis.graph.constants
  if criterion == "bn_scale":
    for sl in analysis.slices:
      if sl.role != base.SCALE or sl.by not in analysis.dims:
        continue
      vals = np.abs(np.asarray(consts[sl.const], dtype=np.float64))
      vals = np.moveaxis(vals, sl.axis, 0).reshape(vals.shape[sl.axis], -1).mean(axis=1)
      np.add.at(total, analysis.dims[sl.by].units, vals)
      np.add.at(count, analysis.dims[sl.by].units, 1)
  else:
    for src in analysis.sources:
      rows = _filters(consts[src.weight], src.weight_axis)
      if criterion == "l1":
        vals = np.abs(rows).sum(axis=1)
      elif criterion == "l2":
        vals = np.sqrt((rows * rows).sum(axis=1))
      else:
        vals = _fpgm(rows)
      total[src.elements] += vals
      count[src.elements] += 1
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _per_unit(analysis, element_scores, gid, channels) -> np.ndarray:
  sel = analysis.element_group == gid
  units = analysis.element_unit[sel]
  vals = element_scores[sel]
  ok = ~np.isnan(vals)
  total = np.bincount(units[ok], weights=vals[ok], minlength=channels)
  count = np.bincount(units[ok], minlength=channels)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def score(analysis: groups_lib.Analysis, criterion: str, seed: int = 0) -> Scores:
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
  elem = _element_scores(analysis, criterion)
  fallback = None
  for g in prunable:
    s = _per_unit(analysis, elem, g.id, g.channels)
    if np.isnan(s).any():
      # bn_scale on a group without batch-norm: rank by filter L1 norm instead.
      if fallback is None:
        fallback = _element_scores(analysis, "l1")
      per_group[g.id], used[g.id] = _per_unit(analysis, fallback, g.id, g.channels), "l1"
    else:
      per_group[g.id], used[g.id] = s, criterion
  return Scores(per_group, used)
