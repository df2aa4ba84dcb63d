"""Filter pruning: load, normalise and analyse; score and plan (a ratio, a budget or
a plan file); rewrite, validate and verify, in increments, each reconstructed
and recovered where asked; grow-and-prune."""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Optional

import numpy as np

from graph_prune import budget as budget_lib
from graph_prune import errors
from graph_prune import heap
from graph_prune import plan as plan_lib
from graph_prune import prepared as prepared_lib
from graph_prune.analysis import groups as groups_lib
from graph_prune.criteria import allocation
from graph_prune.criteria import importance
from graph_prune.pipeline import options as options_lib
from graph_prune.pipeline import oracle_runs
from graph_prune.pipeline.options import Options
from graph_prune.reconstruct import reconstruct as reconstruct_lib
from graph_prune.rewrite import slicing
from graph_prune.verify import oracle


# The prepared model and its rewrite live below the pipeline (the budget searches
# rewrite candidates too); the pipeline's modules and callers use these names.
Prepared = prepared_lib.Prepared
prepare_model = prepared_lib.prepare_model
rewrite = prepared_lib.rewrite


def prepare(in_path: str, options: Options = Options()) -> Prepared:
  ref = options_lib.model_ref(in_path, options)
  # The model as read is normalised in this expression, so that it is gone before the
  # view is built (an argument stays referenced by the caller until the call returns:
  # VGG16 held its weights three times over here).
  return prepared_lib.viewed(ref.format, ref.format.adapter.normalise(ref.load()),
                             prepared_lib.bytes_on_disk(in_path))


def scores_of(prepared: Prepared, options: Options, samples=None,
              seed: Optional[int] = None) -> importance.Scores:
  """The criterion's scores; a calibrated criterion's statistics come from one pass
  of the prepared model over the calibration samples."""
  seed = options.seed if seed is None else seed
  if options.criterion not in importance.CALIBRATED:
    return importance.score(prepared.analysis, options.criterion, seed)
  if samples is None:
    raise errors.UsageError(f"--criterion={options.criterion} needs --calibration_data")
  fmt = prepared.format
  if options.criterion == "taylor":
    stats = options.taylor(prepared.model, [(s.weight, s.weight_axis)
                                            for s in prepared.analysis.sources], samples.fit)
    return importance.score(prepared.analysis, options.criterion, seed, stats, fmt.ops)
  from graph_prune.calibration import activations  # pylint: disable=g-import-not-at-top
  tensors = importance.calibration_tensors(prepared.analysis, options.criterion, fmt.ops)
  stats = activations.channel_stats(fmt, prepared.model, prepared.graph, tensors, samples.fit)
  return importance.score(prepared.analysis, options.criterion, seed, stats, fmt.ops)


def make_plan(prepared: Prepared, options: Options, samples=None,
              measured: Optional[dict] = None) -> plan_lib.Plan:
  """The plan from --plan_in, a budget, or the ratio; a latency budget's
  measurements of the chosen plan go into `measured` (when given)."""
  analysis = prepared.analysis
  if options.plan_in:
    with open(options.plan_in, encoding="utf-8") as f:
      return plan_lib.rebind(plan_lib.Plan.from_json(f.read()), analysis)
  spec = options_lib.spec_of(options)
  if not any(g.prunable for g in analysis.groups):
    reasons = sorted({r for g in analysis.groups for r in g.blocked[:1]})[:3]
    if not analysis.groups:
      reasons = list(analysis.reasons[:3])
      raise errors.NothingToPruneError(
          "nothing prunable: no convolution or dense layer with constant weights found"
          + (f" ({'; '.join(reasons)})" if reasons else ""))
    raise errors.NothingToPruneError(
        "nothing prunable: every channel group is left whole"
        + (f" ({'; '.join(reasons)})" if reasons else ""))
  if not any(g.prunable and not allocation.excluded_by(spec, g) for g in analysis.groups):
    raise errors.NothingToPruneError(
        f"nothing prunable: --exclude={','.join(spec.exclude)} matches every prunable group; "
        "narrow the patterns")
  check_finite(analysis)
  scores = scores_of(prepared, options, samples)
  if budget_lib.budget_of(options) is not None:
    return budget_lib.plan_for_budget(prepared, options, spec, scores, measured)
  if options.allocation == "global":
    return allocation.global_for_ratio(analysis, scores, spec, options.criterion)
  return allocation.allocate(analysis, scores, spec, options.criterion)


def check_finite(analysis: groups_lib.Analysis) -> None:
  """Refuses NaN or infinite values in a constant that pruning would slice: a NaN
  filter scores as the least important and would be removed although its channel
  is live, turning a model that outputs NaN into one that does not."""
  prunable = {g.id for g in analysis.groups if g.prunable}
  seen = set()
  for sl in analysis.slices:
    if sl.const in seen or sl.by not in analysis.dims:
      continue
    seen.add(sl.const)
    units = analysis.dims[sl.by].units
    if not prunable.intersection(analysis.element_group[units].tolist()):
      continue
    value = analysis.graph.constants[sl.const]
    if np.issubdtype(value.dtype, np.floating) and not np.all(np.isfinite(value)):
      raise errors.InputError(
          f"constant '{sl.const}' (read by '{sl.consumer}') holds NaN or infinite values; "
          "the model's weights are broken, fix them before pruning")


def _prune_checked(prepared: Prepared, plan: plan_lib.Plan, options: Options):
  """Rewrite, validate, verify (when asked): the pruned model, its view, the check,
  the copied constants and the seconds the check took."""
  adapter = prepared.format.adapter
  edits = slicing.build_edits(prepared.analysis, plan, slicing.SLICE)
  pruned = adapter.apply_edits(prepared.model, edits)
  copies = copies_of(edits)
  del edits  # its arrays are in the pruned model now; the check needs the memory
  weight_bytes = prepared_lib.weight_bytes(prepared.graph)
  heap.give_back(weight_bytes)
  pruned_view = oracle_runs.validated_view(adapter, pruned)
  verification, verify_s = None, 0.0
  if options.verify:
    t0 = time.perf_counter()
    heap.give_back(weight_bytes)
    masked = oracle_runs.masked_model(adapter, prepared.model, prepared.analysis, plan)
    verification = oracle_runs.run_oracle(adapter, prepared.model, masked, pruned, prepared.graph, options,
                              set(oracle_runs.kept_positions(prepared.analysis, plan)), pruned_view)
    verify_s = time.perf_counter() - t0
  return pruned, pruned_view, verification, copies, verify_s


def copies_of(edits) -> list[dict[str, Any]]:
  """The shared constants that had to be copied, for the report: a constant read by
  several layers that keep different channels of it needs one copy per distinct slice."""
  counts: dict[str, int] = {}
  for src, _ in edits.new_constants.values():
    counts[src] = counts.get(src, 0) + 1
  return [{"constant": src, "copies": n,
           "why": "its readers keep different channels of it: one constant per distinct slice"}
          for src, n in sorted(counts.items())]


def _increment_plan(current: Prepared, options: Options, final: plan_lib.Plan, step: int,
                    samples=None) -> plan_lib.Plan:
  """Increment `step` of options.steps: scores on the current (recovered) weights,
  kept counts on the geometric schedule towards the final plan's."""
  counts = {g.sources: allocation.schedule(g.channels, len(g.keep), options.steps, step,
                                           options.round_to) for g in final.groups}
  scores = scores_of(current, options, samples, options.seed + step)
  return allocation.allocate_counts(current.analysis, scores, counts, final)


@dataclasses.dataclass
class Pruned:
  """What pruning in increments produced."""
  model: Any
  view: Any
  plan: plan_lib.Plan                      # the kept channels, in the original's numbering
  verification: Optional[oracle.Verification]
  increments: list[dict]
  copies: list[dict]


def prune_in_increments(prepared: Prepared, plan: plan_lib.Plan, options: Options,
                        timings: dict[str, float], samples=None) -> Pruned:
  """Prunes to `plan` in options.steps increments on a geometric schedule, each
  rewritten, validated and verified, then reconstructed (options.reconstruct)
  and recovered (options.recover) where asked; adds the time of each stage to
  `timings`."""
  adapter = prepared.format.adapter
  current, original_keep = prepared, {g.sources: np.arange(g.channels) for g in plan.groups}
  tensor_keep: dict[str, np.ndarray] = {}
  increments, verifications, copies = [], [], []
  pruned = pruned_view = None
  for step in range(1, options.steps + 1):
    t1 = time.perf_counter()
    step_plan = (plan if options.steps == 1 else
                 _increment_plan(current, options, plan, step, samples))
    pruned, pruned_view, verification, step_copies, verify_s = _prune_checked(
        current, step_plan, options)
    for gp in step_plan.groups:
      original_keep[gp.sources] = original_keep[gp.sources][list(gp.keep)]
    for tensor, positions in oracle_runs.kept_positions(current.analysis, step_plan).items():
      tensor_keep[tensor] = tensor_keep.get(tensor, np.arange(len(
          current.analysis.dims[tensor])))[positions]
    copies.extend(step_copies)
    increment = {"step": step, "groups": len(step_plan.groups),
                 "verify": dataclasses.asdict(verification) if verification else None}
    t3 = time.perf_counter()
    if options.reconstruct is not None:
      done = reconstruct_lib.reconstruct(prepared.format, prepared.model, prepared.graph,
                                         pruned, pruned_view, tensor_keep, samples,
                                         options.reconstruct)
      pruned, pruned_view, increment["reconstruction"] = done.model, done.view, done.report
    t4 = time.perf_counter()
    if options.recover is not None:
      ckpt = options.recover.checkpoint_dir
      if ckpt and options.steps > 1:
        ckpt = os.path.join(ckpt, f"step_{step}")
      pruned, increment["recovery"] = options.recover(prepared.model, pruned, tensor_keep, ckpt,
                                                      step)
      pruned_view = adapter.to_view(pruned)
    timings["plan_and_rewrite_s"] += t3 - t1 - verify_s
    timings["verify_s"] += verify_s
    timings["reconstruct_s"] += t4 - t3
    timings["recover_s"] += time.perf_counter() - t4
    increments.append(increment)
    if verification:
      verifications.append(verification)
    if step < options.steps:
      current = prepare_model(prepared.format, pruned)
  final_plan = dataclasses.replace(plan, groups=tuple(
      dataclasses.replace(g, keep=tuple(int(k) for k in original_keep[g.sources]))
      for g in plan.groups))
  worst = max(verifications, key=lambda v: v.max_rel_diff) if verifications else None
  return Pruned(pruned, pruned_view, final_plan, worst, increments, copies)


def grow_and_prune(prepared: Prepared, plan: plan_lib.Plan, options: Options,
                   timings: dict[str, float], samples=None) -> Pruned:
  """Grow-and-prune (options.recover.grows): the recovery trains the model at full
  width with the removed channels masked, the parts of the plan taking turns at
  full width, and re-chooses the kept channels of each part by the criterion; the
  last state is then sliced with the final plan and verified like any other."""
  fmt = prepared.format

  def replan(model, current_plan: plan_lib.Plan, part) -> plan_lib.Plan:
    current = prepare_model(fmt, model)
    scores = scores_of(current, options, samples)
    counts = {g.sources: len(g.keep) for g in current_plan.groups if g.group in part}
    fresh = {g.sources: g for g in allocation.allocate_counts(current.analysis, scores, counts,
                                                              current_plan).groups}
    return dataclasses.replace(current_plan, groups=tuple(
        dataclasses.replace(fresh[g.sources], group=g.group) if g.group in part else g
        for g in current_plan.groups))

  t0 = time.perf_counter()
  model, plan, doc = options.recover.grow_and_prune(prepared.model, prepared.analysis, plan,
                                                    replan, options.recover.checkpoint_dir)
  timings["recover_s"] += time.perf_counter() - t0
  trained = prepare_model(fmt, model)
  result = prune_in_increments(trained, plan_lib.rebind(plan, trained.analysis),
                               dataclasses.replace(options, recover=None), timings, samples)
  result.increments[-1]["recovery"] = doc
  return result
