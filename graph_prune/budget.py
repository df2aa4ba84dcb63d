"""Budgets instead of --ratio: the FLOPs or parameters kept (the cost model), a
measured speedup or latency (timed beside the original by the options' latency
probe). The plan (or, with --mode=layer, the number of layers and blocks) that
removes least while meeting the budget: bisection over the uniform ratio, the
global threshold or the count of layers, and for --allocation=latency the
latency model's allocation refined by measurement (NetAdapt). `options` is a
pipeline.Options: its target_*, allocation, criterion and latency fields."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Sequence

from absl import logging
import numpy as np

from graph_prune import errors
from graph_prune import plan as plan_lib
from graph_prune import prepared as prepared_lib
from graph_prune.analysis import blocks as blocks_lib
from graph_prune.analysis import cost as cost_lib
from graph_prune.criteria import allocation
from graph_prune.rewrite import layers as layers_lib

BUDGETS = ("flops", "params", "speedup", "latency_ms")
MEASURED_BUDGETS = ("speedup", "latency_ms")
# A measured budget may be passed by this much before the plan is refined (for
# --allocation=latency, at most LATENCY_REFINEMENTS times).
LATENCY_TOLERANCE = 0.05
LATENCY_REFINEMENTS = 4


def budget_of(options: Any) -> Optional[tuple[str, float]]:
  """(one of BUDGETS, its value), or None without a budget."""
  for what in BUDGETS:
    value = getattr(options, f"target_{what}")
    if value is not None:
      return what, value
  return None


def plan_for_budget(prepared: prepared_lib.Prepared, options: Any, spec: allocation.Spec,
                    scores, measured: Optional[dict] = None) -> plan_lib.Plan:
  """The plan that removes least while meeting the budget: at most a fraction of
  the FLOPs (or parameters) kept, or at least a measured speedup, or at most a
  measured latency. A bisection over the uniform ratio, or over the global
  threshold; each candidate is rewritten and measured: by the cost model (FLOPs
  are bilinear in the widths of a layer's input and output, so a per-channel
  estimate would not be exact), or timed beside the original by options.latency
  on its device and batch size (where the least uniform ratio that meets it
  measures more than LATENCY_TOLERANCE faster, groups are then restored whole
  while the target is still met: restoring_groups). The measurements of the
  chosen plan go into `measured` (when given)."""
  if options.allocation == "latency":
    return plan_for_latency(prepared, options, spec, scores, measured)
  analysis = prepared.analysis
  meter = Meter(prepared, options)
  plans: dict[int, plan_lib.Plan] = {}

  def kept(i: int) -> float:
    plan = plans[i] = make(i)
    if not meter.timed and not any(g.removed for g in plan.groups):
      return 1.0
    return meter.kept(i, prepared_lib.rewrite(prepared, plan), "candidate")

  if options.allocation == "global":
    thresholds = list(allocation.global_thresholds(analysis, scores, spec)) + [np.inf]
    make = lambda i: allocation.allocate_global(analysis, scores, spec, options.criterion,
                                                thresholds[i])
    hi = len(thresholds) - 1
  else:
    # At most 1 - MIN_KEEP: every group keeps a tenth of its channels, as under the
    # global and latency allocations (a group cut to one channel, as 0.999 once
    # allowed, left the built-in model at batch 1 a constant classifier: 10.0 %).
    steps = 1000
    most = 1.0 - allocation.MIN_KEEP
    make = lambda i: allocation.allocate(
        analysis, scores, dataclasses.replace(spec, ratio=min(i / steps, most)),
        options.criterion)
    hi = steps
  meter.refuse_unmet(hi, kept(hi), f"all that --allocation={options.allocation} may remove")
  chosen = least_meeting(0, hi, kept, meter.target)
  if (meter.timed and options.allocation == "uniform"
      and meter.overshoot(chosen) > LATENCY_TOLERANCE):
    return restoring_groups(prepared, meter, plans[chosen], chosen, measured)
  meter.record(chosen, measured)
  return plans[chosen]


def restoring_groups(prepared: prepared_lib.Prepared, meter: "Meter", meeting: plan_lib.Plan,
                     meeting_key: Any, measured: Optional[dict] = None) -> plan_lib.Plan:
  """The uniform search's refinement for a measured budget: the least ratio that
  meets it (`meeting`, measured as meter.trials[meeting_key]) is faster than the
  target by more than LATENCY_TOLERANCE, while the next milder ratio misses it.
  Measured speed is a staircase in the widths (CPU kernels work on blocks of 8 or
  16 channels: 33 channels cost what 48 do), so a ratio step can jump across the
  target: on ResNet50 at 224 the least uniform ratio that met 1.5x, 2x or 3x
  measured 6-13 % faster. Giving every group one channel more (the milder ratio,
  group by group) lands on the target but pays for a block of channels per
  group to keep one (tried: ResNet50 1.5x at batch 32 measured 1.48x at 0.85 of
  the speed per FLOPs removed, where restoring whole groups gives 1.50x at 0.96).
  So groups are restored whole instead (every width stays one that the original
  has, or the meeting ratio's), those that give back the most channels per FLOP
  first (the cost model's estimate, from the analysis), and the most that still
  meet the target are found by bisection over their count."""
  analysis = prepared.analysis
  layers = [(node.inputs[0], node.outputs[0], f)
            for node, f in cost_lib.layer_flops(prepared.graph, prepared.format.ops)]
  removed = meeting.removed_units()

  def flops(units) -> float:
    gone = analysis.removed_elements(units)
    kept = lambda t: (1.0 - float(gone[analysis.dims[t].units].mean())
                      if t in analysis.dims and len(analysis.dims[t].units) else 1.0)
    return sum(f * kept(x) * kept(z) for x, z, f in layers)

  base = flops(removed)
  cut = [g for g in meeting.groups if g.removed]
  added = {g.group: flops({k: v for k, v in removed.items() if k != g.group}) - base
           for g in cut}
  # The first i keep the meeting width, the rest are restored: the best last.
  cut.sort(key=lambda g: (len(g.removed) / max(added[g.group], 1e-9), -g.group))
  plans = {len(cut): meeting}

  def kept(i: int) -> float:
    whole = {g.group for g in cut[i:]}
    plans[i] = dataclasses.replace(meeting, groups=tuple(
        dataclasses.replace(g, keep=tuple(range(g.channels))) if g.group in whole else g
        for g in meeting.groups))
    return meter.kept(("restored", i), prepared_lib.rewrite(prepared, plans[i]),
                      f"{len(cut) - i} of {len(cut)} groups restored")

  chosen = least_meeting(0, len(cut), kept, meter.target)
  meter.record(meeting_key if chosen == len(cut) else ("restored", chosen), measured)
  if measured is not None:
    measured.update(groups_restored=len(cut) - chosen, groups_cut_by_ratio=len(cut))
  return plans[chosen]


class Meter:
  """Candidates of one budget measured as the fraction of it they keep: timed beside
  the original by options.latency (1 / speedup, or milliseconds), or by the cost
  model (FLOPs or parameters over the original's). Timed measurements are kept by
  the caller's key for each candidate (`trials`), so that they are not taken twice.
  `session`: a timing session of the original already built (else one is built)."""

  def __init__(self, prepared: prepared_lib.Prepared, options: Any, session=None):
    self.what, value = budget_of(options)
    self.timed = self.what in MEASURED_BUDGETS
    self.trials: dict[Any, Any] = {}
    self._adapter, self._ops, self._probe = (prepared.format.adapter, prepared.format.ops,
                                             options.latency)
    if self.timed:
      self.session = session or options.latency.session(prepared.model)
      # Kept is the fraction of the latency: 1 / speedup, or milliseconds.
      self.target = 1.0 / value if self.what == "speedup" else value
    else:
      self.session = None
      self._base = getattr(cost_lib.measure(prepared.graph, self._ops), self.what)
      self.target = value

  def kept(self, key, model: Any, label: str) -> float:
    if self.timed:
      m = self.trials[key] = self.session.measure(model)
      logging.info("budget: %s measured %.3fx (%.3g ms; original %.3g ms)", label, m.speedup,
                   m.latency_ms, m.original_ms)
      return 1.0 / m.speedup if self.what == "speedup" else m.latency_ms
    return self.cost_kept(self._adapter.to_view(model))

  def cost_kept(self, view) -> float:
    """The fraction of the FLOPs or parameters a candidate's view keeps (untimed)."""
    return getattr(cost_lib.measure(view, self._ops), self.what) / self._base if self._base \
        else 1.0

  def overshoot(self, key) -> float:
    """How much faster than the target candidate `key` measured (a fraction; timed)."""
    m = self.trials[key]
    return (m.speedup * self.target if self.what == "speedup"
            else self.target / m.latency_ms) - 1

  def refuse_unmet(self, key, least: float, most: str) -> None:
    """A UsageError where removing `most` (candidate `key`, keeping `least`) does not
    meet the budget, or where the original already meets a latency."""
    if self.timed:
      m, batch = self.trials[key], self._probe.batch
      if self.what == "latency_ms" and self.target >= m.original_ms:
        raise already_met(self.target, m, self.session, batch)
      if least > self.target:
        value = 1 / self.target if self.what == "speedup" else self.target
        raise unmet(self.what, value, m, self.session, batch, most)
    elif least > self.target:
      raise errors.UsageError(f"--target_{self.what}={self.target:g} cannot be met: removing "
                              f"{most} keeps {least:.3f} of the {self.what}")

  def record(self, key, measured: Optional[dict]) -> None:
    """Candidate `key`'s measurement into the report's budget block (when timed)."""
    if self.timed and measured is not None:
      measured.update(measured_doc(self.trials[key], self.session, self._probe))


def unmet(what: str, value: float, m, session, batch: int, most: str) -> errors.UsageError:
  """The error for a measured budget that removing `most` does not meet (m: its
  measurement)."""
  return errors.UsageError(
      f"--target_{what}={value:g} cannot be met: removing {most} measures {m.speedup:.2f}x "
      f"({m.latency_ms:.3g} ms against {m.original_ms:.3g} ms; {session.device_label}, "
      f"batch {batch})")


def already_met(value: float, m, session, batch: int) -> errors.UsageError:
  return errors.UsageError(
      f"--target_latency_ms={value:g}: the original already runs in {m.original_ms:.3g} ms "
      f"({session.device_label}, batch {batch}); nothing to remove")


def measured_doc(m, session, probe) -> dict:
  """The chosen plan's measurement, for the report's budget block."""
  return dict(
      measured_speedup=round(m.speedup, 4), measured_speedup_p10=round(m.speedup_p10, 4),
      measured_speedup_p90=round(m.speedup_p90, 4), latency_ms=round(m.latency_ms, 4),
      original_latency_ms=round(m.original_ms, 4), candidates_timed=session.measured,
      device=session.device_label,
      weights="fed as arguments" if getattr(session, "feed_weights", False) else "constants",
      **probe.describe())


def plan_for_latency(prepared: prepared_lib.Prepared, options: Any, spec: allocation.Spec,
                     scores, measured: Optional[dict] = None) -> plan_lib.Plan:
  """--allocation=latency: every linear layer's latency across its widths is
  measured on the probe's device (options.latency.profile, cached); the greedy
  allocation (allocation.allocate_latency) finds widths whose predicted latency,
  the sum of the layers', is the original's over the target speedup; the pruned
  model is then timed beside the original, and while the measured speedup misses
  the target (below it, or above it by more than LATENCY_TOLERANCE) the predicted
  target is scaled by the miss and the allocation run again (NetAdapt's
  measure-and-adjust), at most LATENCY_REFINEMENTS times. A candidate that meets
  the target while measuring faster than the layer model predicted says that the
  model is pessimistic (per-layer times carry overheads that the whole compiled
  model does not pay), so that a milder allocation may meet the target too: then,
  as once aims on both sides of the target are known, the bracket of aims is
  halved (geometrically; measured speed is not smooth in the widths, and scaling
  by the miss can swing across a step for ever) until it is within the
  tolerance. The candidate chosen: of those that meet the target within the
  tolerance, the one aimed lowest (it removes least); else the closest within the
  tolerance below the target; else the mildest that passes it by more, and then
  groups are restored whole while the target is still met (restoring_groups; the
  report's predicted figures stay the allocation's)."""
  what, target = budget_of(options)
  probe = options.latency
  analysis = prepared.analysis
  profile = probe.profile(prepared.graph, prepared.format.ops, prepared.format.name)
  layers = [allocation.LayerCost(l.x, l.z, l.cin, l.cout, f)
            for l, f in zip(profile.layers, profile.costs)]
  if not layers:
    raise errors.NothingToPruneError("--allocation=latency: the model has no linear layer "
                                     "to time")
  full = profile.total()
  session = probe.session(prepared.model)
  if what == "latency_ms":
    base = session.measure(prepared.model)
    if target >= base.original_ms:
      raise already_met(target, base, session, probe.batch)
    speedup = base.original_ms / target
  else:
    speedup = target
  _, floor_ms = allocation.allocate_latency(analysis, scores, spec, options.criterion, layers, 0.0)
  most = full / floor_ms
  tries, results = [], []

  def attempt(aim: float):
    """The allocation for a predicted speedup of `aim` (`most`: all that may go), timed."""
    plan, predicted = allocation.allocate_latency(analysis, scores, spec, options.criterion,
                                                  layers, full / aim if aim < most else 0.0)
    m = session.measure(prepared_lib.rewrite(prepared, plan))
    tries.append({"aimed_speedup": round(aim, 4), "predicted_speedup": round(full / predicted, 4),
                  "measured_speedup": round(m.speedup, 4), "latency_ms": round(m.latency_ms, 4)})
    logging.info("latency allocation: predicted %.3fx, measured %.3fx (target %.3fx)",
                 full / predicted, m.speedup, speedup)
    results.append((plan, m, m.speedup / speedup - 1, full / predicted, aim))
    return results[-1]

  aim = min(speedup, most)
  # The largest aim measured short of the target (the original: 1x) and the least
  # that meets it.
  low, high = 1.0, None
  for _ in range(1 + LATENCY_REFINEMENTS):
    _, m, miss, predicted_speedup, _ = attempt(aim)
    if miss >= 0:
      high = aim if high is None else min(high, aim)
      if miss <= LATENCY_TOLERANCE and m.speedup <= predicted_speedup * (1 + LATENCY_TOLERANCE):
        break     # as predicted: a milder aim would fall short
    elif predicted_speedup >= most * (1 - 1e-9):
      break       # already the most that may go
    else:
      low = max(low, aim)
    if high is None:
      aim = min(aim * speedup / m.speedup, most)
    elif high / low <= 1 + LATENCY_TOLERANCE:
      break
    else:
      aim = math.sqrt(low * high)
  within = [r for r in results if 0 <= r[2] <= LATENCY_TOLERANCE]
  below = [r for r in results if -LATENCY_TOLERANCE <= r[2] < 0]
  over = [r for r in results if r[2] > LATENCY_TOLERANCE]
  if within:      # the mildest that meets the target: it removes least
    chosen = min(within, key=lambda r: r[4])
  elif below:     # the closest short of it, within the tolerance
    chosen = max(below, key=lambda r: r[2])
  elif over:
    chosen = min(over, key=lambda r: r[4])
  else:
    # All that may go, if not tried yet: it comes within the tolerance, or nothing does.
    chosen = next((r for r in results if r[3] >= most * (1 - 1e-9)), None) or attempt(most)
    if chosen[2] < -LATENCY_TOLERANCE:
      raise unmet(what, target, chosen[1], session, probe.batch,
                  "all that --allocation=latency may remove")
  plan, m, miss, predicted_speedup, _ = chosen
  if measured is not None:
    measured.update(
        measured_doc(m, session, probe), predicted_speedup=round(predicted_speedup, 4),
        predicted_layers_ms=round(full / predicted_speedup, 4), original_layers_ms=round(full, 4),
        refinements=tries, latency_profile=profile.doc)
  if miss > LATENCY_TOLERANCE:
    # No aim landed within the tolerance: the measured speed jumped across it
    # between two aims. Groups are restored whole instead, as the uniform search
    # does (the measurement in `measured` becomes the restored plan's).
    meter = Meter(prepared, options, session)
    meter.trials["allocated"] = m
    return restoring_groups(prepared, meter, plan, "allocated", measured)
  return plan


def layers_for_budget(prepared: prepared_lib.Prepared, options: Any,
                      ranked: Sequence[blocks_lib.Block],
                      measured: Optional[dict] = None, or_all: bool = False,
                      meter: Optional[Meter] = None) -> int:
  """How many of `ranked` (least important first) go for the budget: the fewest
  whose removal meets it, by bisection over the count; each candidate is rewritten
  and measured by the cost model, or timed beside the original (as
  plan_for_budget does for channels). Where removing all of them does not meet
  it: all of them with or_all, else a UsageError. `meter`: the budget's Meter
  (its trials keyed by count; else one is made here)."""
  meter = meter or Meter(prepared, options)
  adapter, graph = prepared.format.adapter, prepared.graph

  def kept(count: int) -> float:
    pruned = adapter.apply_edits(prepared.model, layers_lib.layer_edits(graph, ranked[:count]))
    return meter.kept(count, pruned, f"{count} removed")

  least = kept(len(ranked))
  if or_all and least > meter.target:
    return len(ranked)
  meter.refuse_unmet(len(ranked), least, f"all {len(ranked)} removable layers and blocks")
  count = least_meeting(0, len(ranked), kept, meter.target)
  meter.record(count, measured)
  return count


def least_meeting(lo: int, hi: int, kept, target: float) -> int:
  """The least i in (lo, hi] with kept(i) <= target, by bisection, given kept(lo) >
  target >= kept(hi) and kept falling with i."""
  while hi - lo > 1:
    mid = (lo + hi) // 2
    if kept(mid) <= target:
      hi = mid
    else:
      lo = mid
  return hi
