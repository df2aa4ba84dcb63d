"""The report, and the outputs: the export to ONNX or LiteRT (checked against the
pruned model), quantization, and the atomic writes of the model, the plan and
the report."""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Optional

import numpy as np

from graph_prune import budget as budget_lib
from graph_prune import errors
from graph_prune import files
from graph_prune import formats
from graph_prune import heap
from graph_prune import prepared as prepared_lib
from graph_prune import report as report_lib
from graph_prune.analysis import cost as cost_lib
from graph_prune.criteria import allocation
from graph_prune.pipeline import options as options_lib
from graph_prune.pipeline import oracle_runs
from graph_prune.pipeline.filters import Prepared
from graph_prune.pipeline.filters import Pruned
from graph_prune.pipeline.options import Format
from graph_prune.pipeline.options import Options
from graph_prune.quantize import quantize as quantize_lib
from graph_prune.verify import oracle


def _export(tf_adapter, pruned, graph, options: Options, samples=None):
  """The pruned TensorFlow model exported to options.out_format: ONNX by tf2onnx, or
  LiteRT by TensorFlow's TFLite converter (quantized by it with --quantize, from
  `samples`). A float export is checked against the pruned model on the oracle's
  inputs within the tolerance; a quantized one is measured by the caller."""
  if options.out_format == "onnx":
    from graph_prune.adapters import tf_to_onnx  # pylint: disable=g-import-not-at-top
    exported = tf_to_onnx.export(pruned, options.opset)
    doc = {"format": "onnx", "opset": options.opset, "tool": "tf2onnx"}
  else:
    from graph_prune.adapters import tf_to_tflite  # pylint: disable=g-import-not-at-top
    scheme = options.quantize.scheme if options.quantize is not None else "float32"
    exported = tf_to_tflite.convert(pruned, scheme,
                                    samples.fit if samples is not None else None)
    doc = {"format": "tflite", "tool": "tf.lite.TFLiteConverter", "scheme": scheme}
    if scheme != "float32":
      return exported, doc
  what = "ONNX" if options.out_format == "onnx" else "LiteRT"
  target = formats.for_name(options.out_format).adapter
  tf_run = oracle_runs.Checked("pruned", tf_adapter.Runner, pruned)
  run = None
  try:
    run = oracle_runs.Checked(f"exported {what}", target.Runner, exported)
    max_abs = max_rel = 0.0
    for inputs in oracle_runs.oracle_inputs(graph, tf_run, dataclasses.replace(options,
                                                                   seed=options.seed + 1)):
      a, r = oracle.max_diff(tf_run(inputs), run(inputs))
      max_abs, max_rel = max(max_abs, a), max(max_rel, r)
  finally:
    tf_run.close()
    if run is not None:
      run.close()
  if not max_rel <= options.tolerance:
    raise errors.VerificationError(
        f"the {what} export differs from the pruned TensorFlow model by {max_rel:.3g} "
        f"(relative; tolerance {options.tolerance:g}); nothing written")
  return exported, dict(doc, max_abs_diff=max_abs, max_rel_diff=max_rel)


def assemble_report(in_path: str, out_path: str, prepared: Prepared, result: Pruned,
                    spec: allocation.Spec, options: Options, timings: dict[str, float],
                    measured: Optional[dict] = None,
                    layers: Optional[dict] = None) -> report_lib.Report:
  ops = prepared.format.ops
  excluded = {g.id: allocation.excluded_by(spec, g) for g in prepared.analysis.groups}
  unchanged = result.view is prepared.graph
  before = cost_lib.measure(prepared.graph, ops)
  after = before if unchanged else cost_lib.measure(result.view, ops)
  recovering = options.recover is not None and not unchanged
  budget = None
  if options.allocation != "uniform" or budget_lib.budget_of(options) is not None:
    what, target = budget_lib.budget_of(options) or (None, None)
    budget = {"allocation": options.allocation, "target": what,
              "target_kept": target if what not in budget_lib.MEASURED_BUDGETS else None,
              "flops_kept": round(after.flops / before.flops, 6) if before.flops else None,
              "params_kept": round(after.params / before.params, 6) if before.params else None}
    if what in budget_lib.MEASURED_BUDGETS:
      budget["target_value"] = target
      budget.update(measured or {})
  return report_lib.build(
      in_path, out_path, prepared.analysis, result.plan, before, after, result.verification,
      {k: v for k, v in excluded.items() if v}, timings,
      shared_constants_copied=tuple(result.copies), unchanged=unchanged,
      round_to_auto=options.round_to_how or None,
      steps=options.steps if (options.steps > 1 or recovering) else None,
      increments=tuple(result.increments) if (options.steps > 1 or recovering) else None,
      recovery=result.increments[-1]["recovery"] if recovering else None,
      reconstruction=(result.increments[-1].get("reconstruction")
                      if result.increments else None),
      budget=budget, layers=layers)


def write_outputs(prepared: Prepared, result: Pruned, out_path: str, doc: report_lib.Report,
                  options: Options, samples=None) -> report_lib.Report:
  """Exports to ONNX or LiteRT where asked (checked against the pruned model),
  quantizes where asked (`samples`: the calibration samples already read for the
  input, if any), then writes the model, the plan and the report, each atomically;
  returns the final report."""
  adapter, model = prepared.format.adapter, result.model
  if options.out_format == "tflite":
    graph = result.view
    if options.quantize is None:
      samples = None
    elif samples is None:
      samples = options.calibration.load(prepared.format, graph)
    converted, export = _export(adapter, model, prepared.graph, options, samples)
    doc = dataclasses.replace(doc, export=export)
    if options.quantize is not None:
      quantization = quantize_lib.measured(
          prepared.format, model, graph, options_lib.format_for(out_path), converted, samples,
          options.quantize, {"tool": "tf.lite.TFLiteConverter (float32 inputs and outputs)"})
      doc = dataclasses.replace(doc, quantization=quantization)
    model, adapter = converted, options_lib.format_for(out_path).adapter
  elif options.out_format == "onnx" and prepared.format.name != formats.ONNX:
    model, export = _export(adapter, model, prepared.graph, options)
    doc = dataclasses.replace(doc, export=export)
    adapter = options_lib.format_for(out_path).adapter
  if options.quantize is not None and options.out_format != "tflite":
    fmt = options_lib.format_for(out_path)
    model, quantization = quantize_model(
        fmt, model, options, samples if fmt.name == prepared.format.name else None)
    doc = dataclasses.replace(doc, quantization=quantization)
  heap.give_back(prepared_lib.weight_bytes(prepared.graph))   # the check's runs
  adapter.write(model, out_path)
  if options.plan_out:
    files.write_text(options.plan_out, result.plan.to_json())
  if options.report:
    files.write_json(options.report, doc.to_json(), default=_json_default)
  return doc


def quantize_model(fmt: Format, model: Any, options: Options,
                   samples=None) -> tuple[Any, dict]:
  """options.quantize applied to the model about to be written (format `fmt`), with
  `samples` or calibration samples read for it; returns the model and the
  quantization report."""
  graph = fmt.adapter.to_view(model)
  t0 = time.perf_counter()
  if samples is None:
    samples = options.calibration.load(fmt, graph)
  load_s = time.perf_counter() - t0
  model, doc = quantize_lib.quantize(fmt, model, graph, samples, options.quantize)
  doc["samples_load_s"] = round(load_s, 3)
  return model, doc


def _json_default(value):
  if isinstance(value, np.generic):
    return value.item()
  raise TypeError(f"{type(value).__name__} is not JSON serialisable")
