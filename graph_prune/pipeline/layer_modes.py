"""--mode=layer (the least important residual blocks and plain layers removed) and
--mode=mixed (layers and filters chosen together for one budget), each stage
checked by its exact oracle."""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Optional, Sequence

from absl import logging
import numpy as np

from graph_prune import budget as budget_lib
from graph_prune import errors
from graph_prune import plan as plan_lib
from graph_prune import prepared as prepared_lib
from graph_prune.analysis import blocks as blocks_lib
from graph_prune.graph.edits import Edits
from graph_prune.pipeline import filters
from graph_prune.pipeline import oracle_runs
from graph_prune.pipeline.filters import Prepared
from graph_prune.pipeline.filters import Pruned
from graph_prune.pipeline.options import Options
from graph_prune.rewrite import layers as layers_lib
from graph_prune.rewrite import slicing


def _removable(prepared: Prepared) -> blocks_lib.Found:
  found = blocks_lib.find(prepared.graph, prepared.format.ops)
  if not found.blocks:
    why = "; ".join(f"{add}: {reason}" for add, reason in found.skipped[:3])
    raise errors.NothingToPruneError(
        "--mode=layer: nothing removable: no same-shape residual block and no layer that can "
        "be the identity" + (f" ({why})" if why else ""))
  return found


def prune_layers(prepared: Prepared, options: Options, timings: dict[str, float],
                 measured: Optional[dict] = None) -> tuple[Pruned, dict]:
  """--mode=layer: the least important of the removable residual blocks and plain
  layers removed (--ratio of them, or as many as the budget needs), the result
  validated and checked by the oracle against the original with those branches'
  last layers zeroed and those layers' weights the identity (exact)."""
  t0 = time.perf_counter()
  found = _removable(prepared)
  ranked = blocks_lib.order(found)
  if budget_lib.budget_of(options) is not None:
    chosen = ranked[:budget_lib.layers_for_budget(prepared, options, ranked, measured)]
  else:
    chosen = blocks_lib.choose(found, options.ratio)
  if not chosen:
    raise errors.NothingToPruneError(
        f"--mode=layer --ratio={options.ratio:g} removes none of the {len(found.blocks)} "
        "removable layers and blocks; raise --ratio")
  pruned, pruned_view, verification = _remove_checked(prepared, chosen, options, timings, t0)
  increments = []
  if options.recover is not None:
    pruned, pruned_view, increment = _recover_whole(prepared, pruned, options, timings)
    increments.append(dict(increment, verify=dataclasses.asdict(verification)
                           if verification else None))
  empty = plan_lib.empty(prepared.analysis)
  return (Pruned(pruned, pruned_view, empty, verification, increments, []),
          _layers_doc(found, ranked, chosen))


def _remove_checked(prepared: Prepared, chosen: Sequence[blocks_lib.Block], options: Options,
                    timings: dict[str, float], t0: float):
  """The model without `chosen`, its validated view, and the oracle's verification
  against the original with the removed branches zeroed and the removed layers the
  identity (None with --noverify)."""
  graph, adapter = prepared.graph, prepared.format.adapter
  edits = layers_lib.layer_edits(graph, chosen)
  pruned = adapter.apply_edits(prepared.model, edits)
  pruned_view = oracle_runs.validated_view(adapter, pruned)
  timings["plan_and_rewrite_s"] += time.perf_counter() - t0
  if not options.verify:
    return pruned, pruned_view, None
  t1 = time.perf_counter()
  values = blocks_lib.masked_constants(graph, prepared.format.ops, chosen)
  # A zeroed branch is recorded as a mask that cuts every channel, so that a
  # quantized weight is zeroed in its codes (they become the zero point).
  zeroed = {c for b in chosen if b.kind == blocks_lib.BLOCK for c in b.masked}
  masked = oracle_runs.masked_from(adapter, prepared.model, Edits(values, {}, (), selections={
      c: (slicing.MASK, ((0, np.zeros(values[c].shape[0], bool)),)) for c in zeroed
      if np.ndim(values[c])}))
  # The tensors that went are not compared (a removed layer may have fed the outputs).
  gone = frozenset(t for name in edits.drop for t in graph.node(name).outputs)
  verification = oracle_runs.run_oracle(adapter, prepared.model, masked, pruned, graph, options, gone,
                            pruned_view)
  timings["verify_s"] += time.perf_counter() - t1
  return pruned, pruned_view, verification


def _recover_whole(prepared: Prepared, pruned: Any, options: Options,
                   timings: dict[str, float]):
  """options.recover after removing layers: the smaller model trained against the
  original (no channel map)."""
  t0 = time.perf_counter()
  pruned, recovery = options.recover(prepared.model, pruned, {}, options.recover.checkpoint_dir)
  view = prepared.format.adapter.to_view(pruned)
  timings["recover_s"] += time.perf_counter() - t0
  return pruned, view, {"step": 1, "groups": 0, "recovery": recovery}


def _layers_doc(found: blocks_lib.Found, ranked: Sequence[blocks_lib.Block],
                chosen: Sequence[blocks_lib.Block], mode: str = "layer") -> dict:
  removed = {b.end for b in chosen}
  counts = found.counts
  return {
      "mode": mode, "removable": len(found.blocks), "removed": len(chosen),
      "removable_blocks": counts[blocks_lib.BLOCK], "removable_layers": counts[blocks_lib.LAYER],
      "removed_blocks": sum(b.kind == blocks_lib.BLOCK for b in chosen),
      "removed_layers": sum(b.kind == blocks_lib.LAYER for b in chosen),
      # A layer made the identity computes something else than it did: only
      # training gives the accuracy back.
      "needs_recovery": any(b.kind == blocks_lib.LAYER for b in chosen),
      "score": "per output channel, the L1 norm of what removal changes: a branch's last "
               "layer's filter times the |scale| after it; a layer's effective filter minus "
               "the identity; averaged over output channels",
      "oracle": "original with each removed branch's last layer (weight, bias, shifts or "
                "batch-norm scale and shift) zeroed, and each removed layer's weight the "
                "identity kernel, its bias and shifts 0, its scales 1",
      "blocks": [{"kind": b.kind, "node": b.end, "shortcut": b.shortcut,
                  "nodes_removed": len(b.nodes) + 1, "linear_layers": b.linears,
                  "score": round(b.score, 8), "removed": b.end in removed} for b in ranked],
      "not_removable": [{"add": add, "reason": reason} for add, reason in found.skipped]}


# --mode=mixed: at most this many counts of removed layers are tried (0 and the
# fewest that meet the budget alone among them, the rest evenly between), and the
# proxy's affine map is fitted on at most this many calibration samples.
MIXED_COUNTS = 5
PROBE_SAMPLES = 1000


OUTPUT_LOST = ("output_lost: the residual of the best affine map from the candidate's outputs "
               "to the original's (fitted on calibration samples, measured on held-out ones), "
               "relative to the original's spread; before recovery")
PROBED = ("probe_agreement: top-1 agreement with the original on the recovery's held-out "
          "samples after a short recovery of each candidate (--recover_probe_steps); ties "
          "by output_lost")


def _probe_candidates(prepared: Prepared, options: Options, candidates: list,
                      timings: dict[str, float]) -> str:
  """Where recovery is asked and has a probe, each candidate is recovered briefly and
  its held-out agreement recorded in its report entry (c[4]); returns how the winner
  is chosen (PROBED or OUTPUT_LOST)."""
  steps = getattr(options.recover, "probe_steps", 0)
  if len(candidates) < 2 or not steps:
    return OUTPUT_LOST
  t0 = time.perf_counter()
  for _, k, prep_k, plan, try_doc in candidates:
    pruned = filters.rewrite(prep_k, plan) if any(g.removed for g in plan.groups) else prep_k.model
    agreed, doc = options.recover.probe(prepared.model, pruned)
    if agreed is None:   # no held-out samples to measure on
      return OUTPUT_LOST
    try_doc.update(probe_agreement=round(agreed, 6), probe_steps=steps)
    logging.info("mixed: %d layers removed: held-out agreement %.4f after %d steps", k, agreed,
                 steps)
    del pruned, doc
  timings["recover_s"] += time.perf_counter() - t0
  return PROBED


def prune_mixed(prepared: Prepared, options: Options, timings: dict[str, float],
                measured: dict, samples) -> tuple[Prepared, Pruned, dict]:
  """--mode=mixed: layers and filters chosen together for one budget. For each
  count k of the least important removable layers and blocks (0, the fewest that
  meet the budget alone or else all, and evenly between; MIXED_COUNTS at most),
  the k are removed and the filters of what is
  left are allocated (--allocation) for the rest of the budget: the budget over
  what removing the k measured (timed beside the original, or by the cost model).
  Each candidate is scored by how much of the original's outputs its outputs no
  longer carry (agreement.probe_error: the best affine map from its outputs to
  the original's, fitted on calibration samples, its residual on held-out ones),
  and the candidate that lost least wins: a measured proxy for what recovery can
  give back, not a proof of accuracy. Where recovery is asked (a Recovery with
  probe_steps), each candidate is recovered for those steps instead and the one
  that then agrees most with the original on held-out samples wins. The winner is removed and
  pruned again, each stage checked by its exact oracle (the layers against the
  original with them zeroed or the identity, the filters against the model
  without the layers masked), its speed measured beside the original, and it is
  recovered against the original where asked. Returns the model without the
  layers (its groups are what the plan numbers), the result and the report's
  layers block, which lists every candidate tried."""
  from graph_prune.calibration import activations  # pylint: disable=g-import-not-at-top
  from graph_prune.verify import agreement  # pylint: disable=g-import-not-at-top
  t0 = time.perf_counter()
  fmt, graph = prepared.format, prepared.graph
  adapter = fmt.adapter
  found = _removable(prepared)
  ranked = blocks_lib.order(found)
  what, target = budget_lib.budget_of(options)
  # One meter (one timing session: the original compiled once) for the layer counts
  # and the candidates; a count the search for the layers alone measured is not
  # measured again.
  meter = budget_lib.Meter(prepared, options)
  timed, session = meter.timed, meter.session
  # Beyond the fewest layers that meet the budget alone, more would only overshoot it.
  most = budget_lib.layers_for_budget(prepared, options, ranked, or_all=True, meter=meter)
  counts = sorted({round(i * most / (MIXED_COUNTS - 1)) for i in range(MIXED_COUNTS)})
  # The proxy: how much of the original's outputs a candidate's outputs still carry
  # (an affine map fitted on calibration samples, its residual on held-out ones).
  fit, held = samples.fit[:PROBE_SAMPLES], samples.measuring()
  fixed = activations.fixed_batch(graph)
  original = lambda: activations.runner(adapter, prepared.model, (), graph.constants)
  ref_fit, ref_held = (agreement.outputs(original, x, 64, fixed) for x in (fit, held))
  tries, candidates, last_error = [], [], None
  for k in counts:
    model_k = (adapter.apply_edits(prepared.model, layers_lib.layer_edits(graph, ranked[:k]))
               if k else None)
    prep_k = prepared_lib.viewed(fmt, model_k) if k else prepared
    try_doc = {"layers_removed": k}
    if timed:
      if k and k not in meter.trials:
        meter.kept(k, model_k, f"mixed: {k} removed")
      m = meter.trials.get(k)
      gained = m.speedup if k else 1.0
      rest = {"speedup": target / gained, "latency_ms": target}[what]
      met = rest <= 1.0 if what == "speedup" else (m is not None and m.latency_ms <= target)
      try_doc["layers_speedup"] = round(gained, 4)
    else:
      kept = meter.cost_kept(prep_k.graph) if k else 1.0
      rest = target / kept
      met = rest >= 1.0
      try_doc[f"layers_{what}_kept"] = round(kept, 6)
    if met:
      plan = plan_lib.empty(prep_k.analysis)
    else:
      opts_k = dataclasses.replace(options, **{f"target_{what}": rest}, mode="filter",
                                   recover=None)
      try:
        plan = filters.make_plan(prep_k, opts_k, samples)
      except (errors.UsageError, errors.NothingToPruneError) as e:
        last_error = e
        tries.append(dict(try_doc, error=str(e)))
        continue
    pruned = filters.rewrite(prep_k, plan) if any(g.removed for g in plan.groups) else prep_k.model
    view = adapter.to_view(pruned)
    make = lambda p=pruned, v=view: activations.runner(adapter, p, (), v.constants)
    lost = agreement.probe_error(ref_fit, agreement.outputs(make, fit, 64, fixed), ref_held,
                                 agreement.outputs(make, held, 64, fixed))
    try_doc.update(groups_cut=sum(bool(g.removed) for g in plan.groups),
                   output_lost=round(lost, 6))
    tries.append(try_doc)
    candidates.append((lost, k, prep_k, plan, try_doc))
    logging.info("mixed: %d layers removed, %d groups cut: output lost %.4f", k,
                 try_doc["groups_cut"], lost)
    del pruned, view, make
  if not candidates:
    raise errors.UsageError(f"--target_{what}={budget_lib.budget_of(options)[1]:g} "
                            f"cannot be met by --mode=mixed: with the {counts[-1]} removable "
                            f"layers and blocks removed, the filters' budget: {last_error}")
  chosen_by = _probe_candidates(prepared, options, candidates, timings)
  if chosen_by == PROBED:
    _, k, prep_k, plan, _ = max(candidates, key=lambda c: (c[4]["probe_agreement"], -c[0], -c[1]))
  else:
    _, k, prep_k, plan, _ = min(candidates, key=lambda c: (c[0], c[1]))
  del candidates
  timings["plan_and_rewrite_s"] += time.perf_counter() - t0
  chosen = ranked[:k]
  verifications = {}
  if k:
    _, _, verifications["layers"] = _remove_checked(prepared, chosen, options, timings,
                                                    time.perf_counter())
  if any(g.removed for g in plan.groups):
    result = filters.prune_in_increments(prep_k, plan, dataclasses.replace(options, recover=None),
                                 timings)
  else:   # the layers alone meet the budget: their check is the model's
    result = Pruned(prep_k.model, prep_k.graph, plan, verifications.get("layers"), [], [])
  if timed:
    measured.update(budget_lib.measured_doc(session.measure(result.model), session,
                                            options.latency))
  layers = _layers_doc(found, ranked, chosen, mode="mixed")
  layers.update(candidates=tries, chosen_by=chosen_by,
                layers_verify=dataclasses.asdict(verifications["layers"])
                if verifications.get("layers") else None)
  if options.recover is not None:
    model, view, increment = _recover_whole(prepared, result.model, options, timings)
    result = dataclasses.replace(result, model=model, view=view,
                                 increments=result.increments + [increment])
  return prep_k, result, layers
