"""How many units each group keeps, and which: the plan."""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from typing import Callable, Mapping, Sequence

import numpy as np

from graph_prune import errors
from graph_prune import plan as plan_lib
from graph_prune.analysis import groups as groups_lib
from graph_prune.criteria import importance


@dataclasses.dataclass(frozen=True)
class Spec:
  ratio: float                                   # fraction of each group removed
  round_to: int = 1                              # kept count is a multiple of this
  overrides: tuple[tuple[str, float], ...] = ()  # (node-name glob, ratio); first match wins
  exclude: tuple[str, ...] = ()                  # node-name globs whose groups stay whole

  def __post_init__(self):
    for r in [self.ratio] + [r for _, r in self.overrides]:
      if not 0.0 <= r < 1.0:
        raise errors.UsageError(f"ratio {r} is outside [0, 1); give the fraction of channels "
                                "to remove, e.g. 0.5")
    if self.round_to < 1:
      raise errors.UsageError(f"round_to must be at least 1, got {self.round_to}")


def _matches(pattern: str, names) -> bool:
  return any(fnmatch.fnmatchcase(n, pattern) for n in names)


def kept_count(channels: int, ratio: float, round_to: int) -> int:
  """Channels kept: never below one, rounded up to a multiple of round_to."""
  return _rounded(channels, channels - math.floor(ratio * channels + 1e-9), round_to)


def _rounded(channels: int, keep: int, round_to: int) -> int:
  """keep, at least one, rounded up to a multiple of round_to, at most all."""
  return min(channels, math.ceil(max(1, keep) / round_to) * round_to)


def excluded_by(spec: Spec, group: groups_lib.ChannelGroup):
  for pat in spec.exclude:
    if _matches(pat, group.sources):
      return pat
  return None


def allocate(analysis: groups_lib.Analysis, scores: importance.Scores, spec: Spec,
             criterion: str) -> plan_lib.Plan:
  out = []
  for g in analysis.groups:
    if not g.prunable or excluded_by(spec, g):
      continue
    ratio = next((r for pat, r in spec.overrides if _matches(pat, g.sources)), spec.ratio)
    keep_n = kept_count(g.channels, ratio, spec.round_to)
    keep = choose(scores.per_group[g.id], keep_n, analysis.needs.get(g.id, ()))
    out.append(plan_lib.GroupPlan(g.id, g.sources, g.channels, keep, scores.used[g.id]))
  return plan_lib.Plan(tuple(out), criterion, spec.ratio, spec.round_to)


ALLOCATIONS = ("uniform", "global", "latency")
# Global allocation keeps at least this fraction of every group (and one unit).
MIN_KEEP = 0.1


def normalised(scores: importance.Scores, group_id: int) -> np.ndarray:
  """A group's scores over their mean: one scale for all groups, so that a layer is
  not cut harder only because its weights are smaller (a folded batch norm) or it
  is wider (L2 normalisation would do that)."""
  s = np.asarray(scores.per_group[group_id], np.float64)
  mean = float(np.mean(s)) if len(s) else 0.0
  return s / mean if mean > 0 else np.ones_like(s)


def _global_groups(analysis: groups_lib.Analysis, spec: Spec):
  return [g for g in analysis.groups if g.prunable and not excluded_by(spec, g)]


def allocate_global(analysis: groups_lib.Analysis, scores: importance.Scores, spec: Spec,
                    criterion: str, threshold: float) -> plan_lib.Plan:
  """Every group keeps its units whose normalised score is at least `threshold`
  (one ranking across groups), at least MIN_KEEP of its units and one, rounded up
  to a multiple of spec.round_to."""
  out = []
  for g in _global_groups(analysis, spec):
    norm = normalised(scores, g.id)
    keep_n = _rounded(g.channels, max(int(np.sum(norm >= threshold)),
                                       math.ceil(MIN_KEEP * g.channels)), spec.round_to)
    keep = choose(scores.per_group[g.id], keep_n, analysis.needs.get(g.id, ()))
    out.append(plan_lib.GroupPlan(g.id, g.sources, g.channels, keep, scores.used[g.id]))
  total = sum(g.channels for g in out)
  removed = sum(g.channels - len(g.keep) for g in out)
  return plan_lib.Plan(tuple(out), criterion, round(removed / total, 6) if total else 0.0,
                       spec.round_to)


def global_thresholds(analysis: groups_lib.Analysis, scores: importance.Scores,
                      spec: Spec) -> np.ndarray:
  """Every distinct normalised score, ascending: the thresholds worth trying."""
  values = [normalised(scores, g.id) for g in _global_groups(analysis, spec)]
  return np.unique(np.concatenate(values)) if values else np.zeros(0)


def global_for_ratio(analysis: groups_lib.Analysis, scores: importance.Scores, spec: Spec,
                     criterion: str) -> plan_lib.Plan:
  """--allocation=global with --ratio: the lowest-ranked spec.ratio of all units go
  (one ranking across groups, MIN_KEEP and round_to respected)."""
  groups = _global_groups(analysis, spec)
  total = sum(g.channels for g in groups)
  ranked = np.sort(np.concatenate([normalised(scores, g.id) for g in groups]))
  cut = int(math.floor(spec.ratio * total + 1e-9))
  threshold = ranked[cut] if cut < len(ranked) else np.inf
  return allocate_global(analysis, scores, spec, criterion, threshold)


def choose(scores: np.ndarray, keep_n: int, needs=()) -> tuple[int, ...]:
  """The keep_n highest-scoring units (ties to the lower index, so plans are
  deterministic), adjusted so that every need (a set of units of which one must
  stay: a slice's or split's run of channels) keeps its best unit: it replaces
  the lowest-scoring kept unit that no need depends on, or is added."""
  order = np.argsort(-scores, kind="stable")
  keep = set(order[:keep_n].tolist())
  sets = [set(int(u) for u in units) for units, _ in needs]
  rank = lambda u: (scores[u], -u)
  for need in sets:
    if keep & need:
      continue
    best = max(need, key=rank)
    keep.add(best)
    for u in sorted(keep, key=rank):
      if u != best and all(u not in other or len(keep & other) > 1 for other in sets):
        keep.discard(u)
        break
  return tuple(sorted(keep))


def allocate_counts(analysis: groups_lib.Analysis, scores: importance.Scores,
                    counts: Mapping[tuple[str, ...], int], plan_like: plan_lib.Plan
                    ) -> plan_lib.Plan:
  """A plan keeping `counts[sources]` units of each named group (the highest
  scores); groups not named are left whole. One increment of an iterative schedule."""
  out = []
  for g in analysis.groups:
    if g.sources not in counts or not g.prunable:
      continue
    keep_n = min(g.channels, max(1, counts[g.sources]))
    keep = choose(scores.per_group[g.id], keep_n, analysis.needs.get(g.id, ()))
    out.append(plan_lib.GroupPlan(g.id, g.sources, g.channels, keep, scores.used[g.id]))
  return dataclasses.replace(plan_like, groups=tuple(out))


def schedule(channels: int, final: int, steps: int, step: int, round_to: int) -> int:
  """Channels kept after increment `step` of `steps`: a geometric path from
  `channels` to `final` (the same fraction removed each time), rounded up to a
  multiple of round_to, ending exactly at `final`."""
  if step >= steps:
    return final
  keep = channels * (final / channels) ** (step / steps)
  keep = math.ceil(round(keep, 6) / round_to) * round_to
  return int(min(channels, max(final, keep)))


# --- latency-aware allocation --------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LayerCost:
  """A linear layer's latency as a function of its input and output widths."""
  x: str                                 # input activation
  z: str                                 # output activation
  cin: int
  cout: int
  cost: Callable[[float, float], float]  # (input width, output width) -> ms


class _Width:
  """A tensor's channel count for given per-group kept counts, each group keeping
  its units best first (rank 0 = highest normalised score)."""

  def __init__(self, analysis: groups_lib.Analysis, tensor: str, full: int,
               ranks: Mapping[int, np.ndarray]):
    self.fixed, self.parts = full, {}
    dim = analysis.dims.get(tensor)
    if dim is None:
      return
    self.fixed = 0
    parts: dict[int, list[int]] = {}
    for e in dim.units:
      g = int(analysis.element_group[e])
      if g in ranks:
        parts.setdefault(g, []).append(int(ranks[g][analysis.element_unit[e]]))
      else:
        self.fixed += 1
    self.parts = {g: np.sort(np.array(r)) for g, r in parts.items()}

  def __call__(self, kept: Mapping[int, int]) -> int:
    return self.fixed + sum(int(np.searchsorted(r, kept[g])) for g, r in self.parts.items())


def allocate_latency(analysis: groups_lib.Analysis, scores: importance.Scores, spec: Spec,
                     criterion: str, layers: Sequence[LayerCost], target_ms: float
                     ) -> tuple[plan_lib.Plan, float]:
  """Kept counts whose predicted latency (the sum of the layers' costs) is at most
  target_ms, losing the least normalised importance per millisecond saved: a
  greedy that repeatedly takes the next step of one group -- its lowest-ranked
  units, 1/32 of its channels or round_to -- whichever step loses least
  importance per predicted millisecond saved (a step that saves nothing looks
  further, up to the group's floor). Greedy, not a knapsack: a layer's latency
  depends on its input and its output width together, so a group's saving is
  not a fixed item cost; the greedy re-prices every group after each step
  (NetAdapt and HALP choose per-layer widths the same way). Every group keeps
  at least MIN_KEEP of its units and one, round_to respected. Returns the plan
  and its predicted latency (the floor's when target_ms cannot be reached)."""
  groups = _global_groups(analysis, spec)
  r = spec.round_to
  norm = {g.id: normalised(scores, g.id) for g in groups}
  ranks, csum = {}, {}
  for g in groups:
    order = np.argsort(-norm[g.id], kind="stable")
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order))
    ranks[g.id] = rank
    csum[g.id] = np.concatenate([[0.0], np.cumsum(norm[g.id][order])])
  kept = {g.id: g.channels for g in groups}
  floor = {g.id: _rounded(g.channels, math.ceil(MIN_KEEP * g.channels), r) for g in groups}
  step = {g.id: r if r > 1 else max(1, math.ceil(g.channels / 32)) for g in groups}
  widths = [(_Width(analysis, l.x, l.cin, ranks), _Width(analysis, l.z, l.cout, ranks))
            for l in layers]
  touching: dict[int, list[int]] = {g.id: [] for g in groups}
  for i, (a, b) in enumerate(widths):
    for gid in set(a.parts) | set(b.parts):
      touching[gid].append(i)

  def cost(i: int, k: Mapping[int, int]) -> float:
    a, b = widths[i]
    return layers[i].cost(a(k), b(k))

  now = [cost(i, kept) for i in range(len(layers))]
  total = float(sum(now))
  while total > target_ms:
    best = None
    for g in groups:
      gid = g.id
      nk = kept[gid]
      while nk > floor[gid]:
        nk = max(floor[gid], (nk - step[gid]) if r == 1 else ((nk - 1) // r) * r)
        trial = dict(kept)
        trial[gid] = nk
        new = {i: cost(i, trial) for i in touching[gid]}
        saved = sum(now[i] - new[i] for i in new)
        if saved > 1e-12:
          price = (csum[gid][kept[gid]] - csum[gid][nk]) / saved
          if best is None or price < best[0]:
            best = (price, gid, nk, new)
          break
    if best is None:
      break
    _, gid, nk, new = best
    kept[gid] = nk
    for i, v in new.items():
      total += v - now[i]
      now[i] = v
  out = []
  for g in groups:
    keep = choose(scores.per_group[g.id], kept[g.id], analysis.needs.get(g.id, ()))
    out.append(plan_lib.GroupPlan(g.id, g.sources, g.channels, keep, scores.used[g.id]))
  channels = sum(g.channels for g in out)
  removed = sum(g.channels - len(g.keep) for g in out)
  return (plan_lib.Plan(tuple(out), criterion, round(removed / channels, 6) if channels else 0.0,
                        r), total)
