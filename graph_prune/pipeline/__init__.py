"""The pipeline: load -> normalise -> analyse -> score -> plan -> rewrite -> verify -> export.

The one package that chains the stages; the CLIs only turn flags into a call of
`prune`. Its modules: options (the options and their checks), oracle_runs (the
oracle's runs), filters (filter pruning, in increments, grow-and-prune),
layer_modes (--mode=layer and --mode=mixed), outputs (report, export,
quantization, writes).
"""

from __future__ import annotations

import dataclasses
import time

from graph_prune import report as report_lib
from graph_prune.criteria import importance
from graph_prune.pipeline import filters
from graph_prune.pipeline import layer_modes
from graph_prune.pipeline import options as options_lib
from graph_prune.pipeline import oracle_runs
from graph_prune.pipeline import outputs

# The names the pipeline's callers use.
Options = options_lib.Options
Format = options_lib.Format
format_for = options_lib.format_for
check_options = options_lib.check_options
Prepared = filters.Prepared
prepare = filters.prepare
prepare_model = filters.prepare_model
rewrite = filters.rewrite
make_plan = filters.make_plan
run_oracle = oracle_runs.run_oracle
kept_positions = oracle_runs.kept_positions
masked_model = oracle_runs.masked_model


def prune(in_path: str, out_path: str, options: Options = Options()) -> report_lib.Report:
  """Prunes the model at in_path into out_path (same format) and returns the report.

  Stages: check the options; load, normalise and analyse; plan; prune in
  options.steps increments (each verified, recovered after when options.recover);
  assemble the report; export and write. Raises a GraphPruneError subclass on bad
  input, impossible requests or a failed verification; nothing is written then.
  """
  spec = check_options(in_path, out_path, options)
  timings = {"load_s": 0.0, "plan_and_rewrite_s": 0.0, "verify_s": 0.0, "reconstruct_s": 0.0,
             "recover_s": 0.0}
  t0 = time.perf_counter()
  prepared = prepare(in_path, options)
  options_lib.check_not_quantized(prepared, options)
  samples = None
  if options.calibration is not None and (options.reconstruct is not None or
                                          options.criterion in importance.CALIBRATED or
                                          options.mode == "mixed"):
    samples = options.calibration.load(prepared.format, prepared.graph)
  timings["load_s"] = time.perf_counter() - t0
  measured: dict = {}
  if options.mode == "layer":
    result, layers = layer_modes.prune_layers(prepared, options, timings, measured)
    doc = outputs.assemble_report(in_path, out_path, prepared, result, spec, options, timings,
                          measured, layers=layers)
    return outputs.write_outputs(prepared, result, out_path, doc, options, samples)
  if options.mode == "mixed":
    without, result, layers = layer_modes.prune_mixed(prepared, options, timings, measured, samples)
    # The groups and the plan are those of the model without the layers; the
    # figures before are the original's.
    doc = outputs.assemble_report(in_path, out_path, dataclasses.replace(without, graph=prepared.graph),
                          result, spec, options, timings, measured, layers=layers)
    return outputs.write_outputs(prepared, result, out_path, doc, options, samples)
  plan = make_plan(prepared, options, samples, measured)
  removes = any(g.removed for g in plan.groups)
  if removes and getattr(options.recover, "grows", False):
    result = filters.grow_and_prune(prepared, plan, options, timings, samples)
  elif removes:
    result = filters.prune_in_increments(prepared, plan, options, timings, samples)
  else:
    # Nothing removed (--ratio=0, or rounding keeps every channel): the output is
    # the input as it was read, not its normalised form; nothing to verify.
    result = filters.Pruned(options_lib.model_ref(in_path, options).load(), prepared.graph, plan, None, [], [])
  doc = outputs.assemble_report(in_path, out_path, prepared, result, spec, options, timings, measured)
  return outputs.write_outputs(prepared, result, out_path, doc, options, samples)
