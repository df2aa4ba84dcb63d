"""The pruning report: a JSON-ready dict, and its text table for stdout."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from graph_prune import plan as plan_lib
from graph_prune.analysis import cost as cost_lib
from graph_prune.analysis import groups as groups_lib
from graph_prune.verify import oracle

_MAX_REASONS = 5


def build(in_path: str, out_path: str, analysis: groups_lib.Analysis, plan: plan_lib.Plan,
          before: cost_lib.Cost, after: cost_lib.Cost,
          verification: Optional[oracle.Verification], excluded: dict[int, str],
          timings: dict[str, float]) -> dict[str, Any]:
  planned = {g.group: g for g in plan.groups}
  groups, skipped = [], []
  for g in analysis.groups:
    if g.id in planned and len(planned[g.id].keep) < g.channels:
      gp = planned[g.id]
      groups.append({"id": g.id, "sources": list(g.sources), "members": list(g.members),
                     "channels_before": g.channels, "channels_after": len(gp.keep),
                     "criterion": gp.criterion})
    else:
      if g.blocked:
        reasons = list(g.blocked[:_MAX_REASONS])
      elif g.id in excluded:
        reasons = [f"excluded by --exclude={excluded[g.id]}"]
      elif g.id in planned:
        reasons = [f"nothing removed: the ratio and round_to keep all {g.channels} channels"]
      else:
        reasons = ["not in the plan"]
      skipped.append({"id": g.id, "sources": list(g.sources), "channels": g.channels,
                      "reasons": reasons, "more_reasons": max(0, len(g.blocked) - _MAX_REASONS)})
  doc = {
      "input": in_path, "output": out_path, "criterion": plan.criterion, "ratio": plan.ratio,
      "round_to": plan.round_to,
      "params_before": before.params, "params_after": after.params,
      "flops_before": before.flops, "flops_after": after.flops,
      "const_bytes_before": before.const_bytes, "const_bytes_after": after.const_bytes,
      "groups_total": len(analysis.groups), "groups_pruned": len(groups),
      "groups": groups, "skipped": skipped, "timings_s": timings,
      "verify": dataclasses.asdict(verification) if verification else None,
  }
  return doc


def _pct(before: int, after: int) -> str:
  return f"{100.0 * (before - after) / before:5.1f}%" if before else "  n/a"


def text(doc: dict[str, Any]) -> str:
  lines = [f"graph_prune: {doc['input']} -> {doc['output']}  "
           f"(criterion {doc['criterion'] or 'plan'}, ratio {doc['ratio']}, "
           f"round_to {doc['round_to']})", ""]
  if doc.get("round_to_auto"):
    lines.insert(1, f"round_to=auto: {doc['round_to_auto']}")
  lines.append(f"{'':14}{'before':>16}{'after':>16}{'removed':>10}")
  for key, label in (("params", "parameters"), ("flops", "FLOPs"), ("const_bytes", "bytes")):
    b, a = doc[f"{key}_before"], doc[f"{key}_after"]
    lines.append(f"{label:14}{b:>16,}{a:>16,}{_pct(b, a):>10}")
  lines.append("")
  lines.append(f"groups: {doc['groups_pruned']} pruned, {len(doc['skipped'])} left whole, "
               f"of {doc['groups_total']}")
  for g in doc["groups"]:
    lines.append(f"  pruned  #{g['id']:<4} {g['channels_before']:>5} -> {g['channels_after']:<5}"
                 f" {g['criterion']:8} {g['sources'][0]}"
                 + (f" (+{len(g['sources']) - 1} coupled)" if len(g['sources']) > 1 else ""))
  for g in doc["skipped"]:
    lines.append(f"  whole   #{g['id']:<4} {g['channels']:>5}          {g['sources'][0]}: "
                 f"{g['reasons'][0]}" + (f" (+{len(g['reasons']) - 1 + g['more_reasons']} more)"
                                         if len(g['reasons']) > 1 else ""))
  for c in doc.get("shared_constants_copied", ()):
    lines.append(f"  copied  {c['constant']}: {c['copies']} extra "
                 f"cop{'y' if c['copies'] == 1 else 'ies'} ({c['why']})")
  v = doc["verify"]
  lines.append("")
  if doc.get("unchanged"):
    lines.append("verification: not needed (nothing removed; the output is the input model)")
  elif v is None:
    lines.append("verification: skipped (--noverify)")
  else:
    lines.append(f"verification: {'PASSED' if v['passed'] else 'FAILED'}  max abs diff "
                 f"{v['max_abs_diff']:.3g}, max rel diff {v['max_rel_diff']:.3g} "
                 f"(tolerance {v['tolerance']:.0e}, {v['samples']} seeded samples)")
    lines.append(f"  pruning moved the outputs by at most {v['effect_max_abs']:.3g} "
                 f"(rel {v['effect_max_rel']:.3g}) against the unpruned model")
  for inc in doc.get("increments", ()):
    r = inc.get("recovery")
    if not r:
      continue
    where = f"step {inc['step']}/{doc['steps']}: " if doc["steps"] > 1 else ""
    before, after = r["holdout_agreement_before"], r["holdout_agreement_after"]
    agree = (f"agreement with the original on {r['holdout_samples']} held-out samples "
             f"{before:.4f} -> {after:.4f}" if before is not None else "no held-out samples")
    work = (f"{r['train_steps']} steps, {r['train_s']:.1f} s" if "train_steps" in r else
            f"{r['sites_adjusted']}/{r['sites']} layers re-fitted")
    lines.append(f"recovery: {where}{r['method']} ({work}); {agree}")
  e = doc.get("export")
  if e:
    lines.append(f"export: {e['format']} (opset {e['opset']}, {e['tool']}) matches the pruned "
                 f"model within {e['max_rel_diff']:.3g} relative")
  return "\n".join(lines)
