"""The pruning report: a frozen dataclass, its JSON form (--report) and its text
table for stdout.

JSON schema (the keys of Report.to_json(); every key is always there unless
marked "optional"):

  input, output                 paths as given
  criterion, ratio, round_to    the plan's ("" criterion: a plan read with --plan_in)
  round_to_auto                 optional: how --round_to=auto chose the multiple
  params_before/after           floating-point constant elements with at least one axis
  flops_before/after            multiply-adds x 2 of the linear layers, one sample
  const_bytes_before/after      bytes of all constants
  groups_total, groups_pruned   channel groups found; of them pruned
  groups                        per pruned group: id, sources, members, channels_before,
                                channels_after, criterion
  skipped                       per group left whole: id, sources, channels, reasons (up
                                to 5), more_reasons
  shared_constants_copied       per shared constant that needed copies: constant, copies, why
  timings_s                     load_s (with the calibration samples), plan_and_rewrite_s,
                                verify_s, reconstruct_s, recover_s
  verify                        the oracle's result (oracle.Verification as a dict), or
                                null when skipped (--noverify) or not needed (unchanged)
  unchanged                     true when nothing was removed: the output is the input
  steps, increments             optional: with --steps > 1 or --recover: per increment
                                step, groups, verify, recovery
  recovery                      optional: the last increment's recovery report
  reconstruction                optional: the last increment's reconstruction report:
                                method, data, samples, holdout, ridge, max_rows,
                                layers_refitted, layers (node, inputs_kept, rows,
                                intercept_into, rel_error_before/after on the rows),
                                skipped, holdout_samples, holdout_before/after
                                (agreement, rel_error, max_rel_diff against the
                                original: the sliced and the reconstructed model), seconds
  export                        optional: format, opset (onnx), tool, scheme (tflite),
                                max_abs_diff, max_rel_diff of an --out_format=onnx or
                                tflite export (not for a quantized LiteRT export: see
                                quantization)
  budget                        optional: with --allocation=global or a budget:
                                allocation, target ("flops", "params", "speedup",
                                "latency_ms" or null), target_kept (the fraction asked
                                for; null for the measured budgets), flops_kept,
                                params_kept; for speedup and latency_ms: target_value
                                (the speedup or milliseconds asked for), the chosen
                                plan's measured_speedup (median, _p10, _p90 over the
                                A/B rounds), latency_ms, original_latency_ms,
                                candidates_timed, device (where they ran),
                                device_requested, xla, batch, max_seconds, target_rse;
                                for a uniform ratio that passed a measured budget by
                                more than 5 %: groups_cut_by_ratio, groups_restored
                                (of them, those left whole to come closer)
  layers                        optional: with --mode=layer: mode, removable, removed
                                (and of them _blocks and _layers), needs_recovery (a
                                plain layer was made the identity), score and oracle
                                (how candidates are ranked and checked), blocks (kind
                                block or layer, node: the addition or the layer's last
                                node, shortcut, nodes_removed, linear_layers, score,
                                removed; every candidate, least score first),
                                not_removable (add, reason; additions of two computed
                                tensors)
  quantization                  optional: --quantize's report (quantize/quantize.py):
                                scheme, format, tool, model_bytes_before/after, size_ratio,
                                holdout_samples, holdout (agreement, rel_error,
                                max_rel_diff against the float model), min_agreement,
                                quantize_s, measure_s, samples_load_s; int8: method,
                                per_channel, calibration_samples, linear_layers,
                                linear_layers_float, float_ops; codebook: bits, packed,
                                init, max_iterations, weights, weight_bytes_float/stored,
                                weight_compression, weight_rel_error_mean/max, layers

The dataclass is also a read-only mapping over these keys (report["verify"]), so
code reading a report reads the same keys as a reader of the JSON file.
"""

from __future__ import annotations

import collections.abc
import dataclasses
from typing import Any, Optional

from graph_prune import plan as plan_lib
from graph_prune.analysis import cost as cost_lib
from graph_prune.analysis import groups as groups_lib
from graph_prune.verify import oracle

_MAX_REASONS = 5
_OPTIONAL = ("round_to_auto", "steps", "increments", "recovery", "reconstruction", "export",
             "quantization", "budget", "layers")


@dataclasses.dataclass(frozen=True)
class Report(collections.abc.Mapping):
  input: str
  output: str
  criterion: str
  ratio: float
  round_to: int
  params_before: int
  params_after: int
  flops_before: int
  flops_after: int
  const_bytes_before: int
  const_bytes_after: int
  groups_total: int
  groups_pruned: int
  groups: tuple[dict, ...]
  skipped: tuple[dict, ...]
  timings_s: dict
  verify: Optional[dict]
  shared_constants_copied: tuple[dict, ...] = ()
  unchanged: bool = False
  round_to_auto: Optional[str] = None
  steps: Optional[int] = None
  increments: Optional[tuple[dict, ...]] = None
  recovery: Optional[dict] = None
  reconstruction: Optional[dict] = None
  export: Optional[dict] = None
  quantization: Optional[dict] = None
  budget: Optional[dict] = None
  layers: Optional[dict] = None

  def to_json(self) -> dict[str, Any]:
    """The JSON form: the schema above, optional keys only where they apply."""
    out = {}
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if field.name in _OPTIONAL and value is None:
        continue
      out[field.name] = list(value) if isinstance(value, tuple) else value
    return out

  def __getitem__(self, key: str) -> Any:
    if key not in self._keys():
      raise KeyError(key)
    value = getattr(self, key)
    return list(value) if isinstance(value, tuple) else value

  def __iter__(self):
    return iter(self._keys())

  def __len__(self) -> int:
    return len(self._keys())

  def _keys(self) -> list[str]:
    return [f.name for f in dataclasses.fields(self)
            if not (f.name in _OPTIONAL and getattr(self, f.name) is None)]


def build(in_path: str, out_path: str, analysis: groups_lib.Analysis, plan: plan_lib.Plan,
          before: cost_lib.Cost, after: cost_lib.Cost,
          verification: Optional[oracle.Verification], excluded: dict[int, str],
          timings: dict[str, float], **extra: Any) -> Report:
  """The report of a run; `extra` sets the fields after `verify`."""
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
        reasons = [f"nothing removed: the allocation (ratio, budget, round_to) keeps all "
                   f"{g.channels} channels"]
      else:
        reasons = ["not in the plan"]
      skipped.append({"id": g.id, "sources": list(g.sources), "channels": g.channels,
                      "reasons": reasons, "more_reasons": max(0, len(g.blocked) - _MAX_REASONS)})
  return Report(
      input=in_path, output=out_path, criterion=plan.criterion, ratio=plan.ratio,
      round_to=plan.round_to, params_before=before.params, params_after=after.params,
      flops_before=before.flops, flops_after=after.flops,
      const_bytes_before=before.const_bytes, const_bytes_after=after.const_bytes,
      groups_total=len(analysis.groups), groups_pruned=len(groups), groups=tuple(groups),
      skipped=tuple(skipped), timings_s=dict(timings),
      verify=dataclasses.asdict(verification) if verification else None, **extra)


def _pct(before: int, after: int) -> str:
  return f"{100.0 * (before - after) / before:5.1f}%" if before else "  n/a"


def text(doc) -> str:
  """The report (a Report or its JSON form) as text for stdout."""
  lay = doc.get("layers")
  how = (f"mode {lay['mode']}, {lay['removed']} of {lay['removable']} layers removed" if lay else
         f"criterion {doc['criterion'] or 'plan'}, ratio {doc['ratio']}, "
         f"round_to {doc['round_to']}")
  lines = [f"graph_prune: {doc['input']} -> {doc['output']}  ({how})", ""]
  if doc.get("round_to_auto"):
    lines.insert(1, f"round_to=auto: {doc['round_to_auto']}")
  lines.append(f"{'':14}{'before':>16}{'after':>16}{'removed':>10}")
  for key, label in (("params", "parameters"), ("flops", "FLOPs"), ("const_bytes", "bytes")):
    b, a = doc[f"{key}_before"], doc[f"{key}_after"]
    lines.append(f"{label:14}{b:>16,}{a:>16,}{_pct(b, a):>10}")
  b = doc.get("budget")
  if b:
    line = ("mode layer: the least important layers and blocks first" if lay and
            lay["mode"] == "layer" else
            f"mode mixed: {lay['removed']} layers and blocks removed, then filters by "
            f"--allocation={b['allocation']}" if lay else
            f"allocation: {b['allocation']}, " + (
                f"ratio {doc['ratio']:g} in every group" + (
                    f" but {b['groups_restored']} of the {b['groups_cut_by_ratio']} it cuts, "
                    "left whole" if b.get("groups_restored") else "")
                if b["allocation"] == "uniform" else
                f"{doc['ratio']:.1%} of the channels removed, ranked across groups"))
    if b["target"] == "speedup":
      line += (f"; budget: {b['target_value']:g}x faster, measured {b['measured_speedup']:.2f}x "
               f"({b['latency_ms']:.3g} ms against {b['original_latency_ms']:.3g} ms, batch "
               f"{b['batch']}, {b['device']}; {b['candidates_timed']} candidates timed)")
    elif b["target"] == "latency_ms":
      line += (f"; budget: {b['target_value']:g} ms, measured {b['latency_ms']:.3g} ms "
               f"({b['measured_speedup']:.2f}x the original's {b['original_latency_ms']:.3g} "
               f"ms, batch {b['batch']}, {b['device']}; {b['candidates_timed']} candidates "
               "timed)")
    elif b["target"]:
      line += (f"; budget: keep {b['target_kept']:g} of the {b['target']}, kept "
               f"{b[b['target'] + '_kept']:.3f}")
    lines.append(line)
  if lay:
    for c in lay.get("candidates", ()):
      lines.append(f"  mixed candidate: {c['layers_removed']} layers/blocks removed, " + (
          f"filters refused: {c['error']}" if "error" in c else
          f"{c['groups_cut']} groups cut, output lost {c['output_lost']:.4g} (held-out "
          "calibration samples)"))
    lines.append(f"layers: {lay['removed']} of {lay['removable']} removed: "
                 f"{lay['removed_blocks']} of {lay['removable_blocks']} residual blocks, "
                 f"{lay['removed_layers']} of {lay['removable_layers']} plain layers made the "
                 f"identity ({len(lay['not_removable'])} additions not removable)")
    for b in lay["blocks"]:
      if b["removed"]:
        lines.append(f"  removed {b['kind']} {b['node']}: {b['nodes_removed']} nodes, "
                     f"{b['linear_layers']} linear, score {b['score']:.4g}")
    if lay["needs_recovery"]:
      lines.append("  a layer made the identity computes something else: the model needs "
                   "recovery" + (" (run below)" if doc.get("recovery") else
                                 " (--recover=distill with unlabelled inputs)"))
  if not lay or (lay["mode"] == "mixed" and doc["groups_pruned"]):   # layers alone: no channels
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
    # --mode=mixed: the layers' check, then the filters' against the model without
    # the layers (where filters were cut; else the layers' check is the model's).
    filters = not lay or (lay["mode"] == "mixed" and doc["groups_pruned"])
    removed = "those channels removed" if filters else (
        "those blocks' branches zeroed and those layers the identity")
    reference = "the model without those layers" if filters and lay and lay[
        "removed"] else "the original"
    if filters and lay and lay["removed"]:
      lv = lay.get("layers_verify")
      lines.append("verification of the layers removed: " + (
          "skipped (--noverify)" if lv is None else
          f"{'PASSED' if lv['passed'] else 'FAILED'}: the model without them computes "
          "exactly what the original computes with those blocks' branches zeroed and those "
          f"layers the identity (max rel diff {lv['max_rel_diff']:.3g}); of the filters: "
          "below, against the model without the layers"))
    lines.append(f"verification: {'PASSED' if v['passed'] else 'FAILED'}: the pruned model "
                 f"computes exactly what {reference} computes with {removed} "
                 f"(max abs diff {v['max_abs_diff']:.3g}, max rel diff {v['max_rel_diff']:.3g}, "
                 f"tolerance {v['tolerance']:.0e}, {v['samples']} seeded samples)")
    lines.append(f"  outputs changed by up to {v['effect_max_abs']:.3g} (rel "
                 f"{v['effect_max_rel']:.3g}) against the unpruned model: expected, "
                 f"{'channels' if filters else 'layers'} were removed"
                 + ("; see reconstruction/recovery below for accuracy"
                    if doc.get("reconstruction") or doc.get("recovery") else
                    "; restore accuracy with --recover=distill" if lay else
                    "; restore accuracy with --reconstruct or --recover"))
  r = doc.get("reconstruction")
  if r:
    b, a = r["holdout_before"], r["holdout_after"]
    agree = (f"top-1 agreement with the original {b['agreement']:.2%} -> {a['agreement']:.2%}, "
             if b["agreement"] is not None else "")
    lines.append(f"reconstruction: {r['method']}, {r['layers_refitted']} layers re-fitted on "
                 f"{r['samples']} samples ({r['seconds']:.1f} s); on {r['holdout_samples']} "
                 f"held-out samples {agree}relative error {b['rel_error']:.3g} -> "
                 f"{a['rel_error']:.3g}")
    if r["skipped"]:
      lines.append(f"  not re-fitted: {r['skipped'][0]}" +
                   (f" (+{len(r['skipped']) - 1} more)" if len(r["skipped"]) > 1 else ""))
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
    aug = r.get("augment")
    if aug:
      work += ", augmented: " + ", ".join(
          ["flip"] * aug["flip"] + [f"shift {aug['shift']} px"] * bool(aug["shift"])
          + [f"mixup {aug['mixup']:g}"] * bool(aug["mixup"]))
    if r.get("dropout"):
      work += f", dropout {r['dropout']['rate']:g} at {r['dropout']['layer']}"
    norm = r.get("batch_stats")
    if norm:
      work += (f", batch statistics at {norm['layers']} layers (folded back with "
               f"{norm['calibration_samples']} samples)")
    lines.append(f"recovery: {where}{r['method']} ({work}); {agree}")
  e = doc.get("export")
  if e:
    how = f"opset {e['opset']}, {e['tool']}" if "opset" in e else e["tool"]
    if "max_rel_diff" in e:
      lines.append(f"export: {e['format']} ({how}) matches the pruned model within "
                   f"{e['max_rel_diff']:.3g} relative")
    else:
      lines.append(f"export: {e['format']} ({how}, {e['scheme']}): measured below")
  lines.extend(_quantization_text(doc.get("quantization")))
  return "\n".join(lines)


def _quantization_text(doc: Optional[dict]) -> list[str]:
  if not doc:
    return []
  h = doc["holdout"]
  agree = (f"top-1 agreement with the float model {h['agreement']:.2%}, "
           if h["agreement"] is not None else "")
  if doc["scheme"] == "int8" and "method" in doc:
    what = (f"int8 ({doc['method']}, {doc['calibration_samples']} calibration samples, "
            f"{doc['linear_layers'] - doc['linear_layers_float']}/{doc['linear_layers']} linear "
            "layers int8)")
  elif doc["scheme"] in ("int8", "float16", "bfloat16"):
    what = doc["scheme"] + {"tflite": " (TFLite converter)",
                            "tensorflow": " weights and compute, for XLA"}.get(doc["format"], "")
  else:
    what = (f"{doc['scheme']} ({doc['weights']} weights, {doc['weight_compression']:.2f}x "
            f"smaller, relative weight error mean {doc['weight_rel_error_mean']:.3g})")
  return [f"quantization: {what}: model {doc['model_bytes_before']:,} -> "
          f"{doc['model_bytes_after']:,} bytes ({doc['size_ratio']:.2f}x smaller); on "
          f"{doc['holdout_samples']} held-out samples {agree}relative error "
          f"{h['rel_error']:.3g}, max relative difference {h['max_rel_diff']:.3g}"]
