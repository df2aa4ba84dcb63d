"""The pipeline: load -> normalise -> analyse -> score -> plan -> rewrite -> verify -> export.

The one module that chains the stages; the CLIs only turn flags into a call of
`prune`.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
import time
from typing import Any, Optional, Sequence

from absl import logging
import numpy as np

from graph_prune import errors
from graph_prune import files
from graph_prune import budget as budget_lib
from graph_prune import formats
from graph_prune import heap
from graph_prune import plan as plan_lib
from graph_prune import prepared as prepared_lib
from graph_prune import report as report_lib
from graph_prune.analysis import blocks as blocks_lib
from graph_prune.analysis import cost as cost_lib
from graph_prune.analysis import groups as groups_lib
from graph_prune.criteria import allocation
from graph_prune.criteria import importance
from graph_prune.graph.edits import Edits
from graph_prune.quantize import options as quantize_options
from graph_prune.quantize import quantize as quantize_lib
from graph_prune.reconstruct import reconstruct as reconstruct_lib
from graph_prune.rewrite import layers as layers_lib
from graph_prune.rewrite import slicing
from graph_prune.verify import oracle


@dataclasses.dataclass(frozen=True)
class Options:
  ratio: float = 0.5
  criterion: str = "l1"
  round_to: int = 1
  round_to_how: str = ""     # how an automatic round_to was chosen, for the report
  overrides: tuple[tuple[str, float], ...] = ()
  exclude: tuple[str, ...] = ()
  seed: int = 0
  plan_in: Optional[str] = None
  plan_out: Optional[str] = None
  report: Optional[str] = None
  verify: bool = True
  tolerance: float = 1e-4
  signature: Optional[str] = None
  inputs: tuple[str, ...] = ()
  outputs: tuple[str, ...] = ()
  overwrite: bool = False
  out_format: str = "same"   # "same", or "onnx" to export a TensorFlow input with tf2onnx
  opset: int = 17            # ONNX opset of that export
  steps: int = 1             # prune in this many increments (recovery after each)
  # The recovery step after each increment, or None: an object with check(),
  # checkpoint_dir and __call__(original, pruned, kept, checkpoint_dir) -> (model,
  # report) -- graph_prune.recover.recover.Recovery. Handed in, so that pruning
  # needs no training code.
  recover: Any = None
  # (input name or "" for the only input, dims) for the verification inputs.
  input_shapes: tuple[tuple[str, tuple[int, ...]], ...] = ()
  # Re-fit the layers after each increment (reconstruct.Options), or None.
  reconstruct: Optional[reconstruct_lib.Options] = None
  # The taylor criterion's filter scores (TensorFlow, gradients): a callable
  # (model, [(weight constant, output axis)], samples) -> {weight: per-filter
  # scores} -- graph_prune.recover.taylor.filter_scores. Handed in like `recover`.
  taylor: Any = None
  # Where calibration samples come from (calibrated criteria, reconstruction): an
  # object with check() and load(format, graph view) -> samples --
  # graph_prune.calibration.samples.Spec. Handed in, so that pruning needs no
  # data-reading code.
  calibration: Any = None
  # Quantize the output after pruning and recovery (quantize.Options), or None.
  quantize: Optional[quantize_lib.Options] = None
  # How kept counts are chosen: "uniform" (every group loses `ratio`) or "global"
  # (one ranking of normalised scores across groups; allocation.py).
  allocation: str = "uniform"
  # A budget instead of `ratio`: the fraction of FLOPs or of parameters kept, or a
  # measured speedup over the original or latency in milliseconds (timed by `latency`).
  target_flops: Optional[float] = None
  target_params: Optional[float] = None
  target_speedup: Optional[float] = None
  target_latency_ms: Optional[float] = None
  # Times candidates for the latency budgets: bench.latency.Probe (device, XLA, batch
  # size, timing settings). Handed in, so that pruning imports no runtime for it.
  latency: Any = None
  # "filter" (channels) or "layer" (whole residual blocks: analysis/blocks.py; --ratio
  # is then the fraction of the removable blocks removed).
  mode: str = "filter"


Format = formats.Format
# The prepared model and its rewrite live below the pipeline (the budget searches
# rewrite candidates too); the names stay here for the pipeline's callers.
Prepared = prepared_lib.Prepared
prepare_model = prepared_lib.prepare_model
rewrite = prepared_lib.rewrite


def format_for(path: str) -> formats.Format:
  return formats.for_path(path)


def _check_paths(in_path: str, out_path: str, options: Options) -> None:
  if os.path.abspath(in_path) == os.path.abspath(out_path):
    raise errors.UsageError("--out is the input path; the input is never overwritten")
  for path, what in ((out_path, "--out"), (options.plan_out, "--plan_out"),
                     (options.report, "--report")):
    if path and os.path.exists(path) and not options.overwrite:
      raise errors.UsageError(f"{what} '{path}' exists; pass --overwrite to replace it")
  if formats.name_of(in_path) == formats.TFLITE:
    raise errors.UsageError(f"'{in_path}' is a LiteRT model: graph_prune prunes TensorFlow and "
                            "ONNX models and writes LiteRT with --out_format=tflite")
  if options.out_format not in ("same", "onnx", "tflite"):
    raise errors.UsageError(f"--out_format must be 'same', 'onnx' or 'tflite', not "
                            f"'{options.out_format}'")
  if options.out_format == "onnx" and not out_path.endswith(".onnx"):
    raise errors.UsageError("--out_format=onnx writes an ONNX file: give --out=NAME.onnx")
  if options.out_format == "tflite":
    if formats.name_of(in_path) != formats.TENSORFLOW:
      raise errors.UsageError("--out_format=tflite converts TensorFlow models; for an ONNX "
                              "input keep --out_format=same")
    if not out_path.endswith(".tflite"):
      raise errors.UsageError("--out_format=tflite writes a LiteRT file: give --out=NAME.tflite")
  elif out_path.endswith(".tflite"):
    raise errors.UsageError("--out=NAME.tflite: give --out_format=tflite")
  if options.plan_in and not os.path.isfile(options.plan_in):
    raise errors.InputError(f"--plan_in '{options.plan_in}' does not exist")


def model_ref(in_path: str, options: Options) -> formats.ModelRef:
  return formats.ModelRef(in_path, options.signature, options.inputs, options.outputs)


def prepare(in_path: str, options: Options = Options()) -> Prepared:
  ref = model_ref(in_path, options)
  # The model as read is normalised in this expression, so that it is gone before the
  # view is built (an argument stays referenced by the caller until the call returns:
  # VGG16 held its weights three times over here).
  return prepared_lib.viewed(ref.format, ref.format.adapter.normalise(ref.load()),
                             prepared_lib.bytes_on_disk(in_path))


def spec_of(options: Options) -> allocation.Spec:
  return allocation.Spec(options.ratio, options.round_to, options.overrides, options.exclude)


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
  spec = spec_of(options)
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


class _Checked:
  """A runner whose failures say which of the oracle's models failed: the original
  failing is a problem of the input (or of the inputs the oracle made up for it);
  the masked or pruned model failing is a failed verification."""

  def __init__(self, what: str, make, model):
    self.what = what
    self._runner = None
    self._runner = self._guard(make, model)

  def _guard(self, fn, *args):
    try:
      return fn(*args)
    except errors.RunError as e:
      if self.what == "original":
        raise errors.InputError(f"the input model does not run on the verification inputs: {e}; "
                                "give the input shape with --input_shape") from None
      raise errors.VerificationError(f"verification failed: the {self.what} model does not run: "
                                     f"{e}; nothing written") from None

  def __call__(self, feeds):
    return self._guard(self._runner, feeds)

  def close(self):
    if self._runner is not None:
      self._runner.close()


def oracle_inputs(graph, original: "_Checked", options: Options) -> list[list[np.ndarray]]:
  """The oracle's input sets. Input dims the graph leaves unknown (besides the
  batch) and --input_shape does not give take the first of oracle.SIZES at which
  the original model runs: a 5x5 or an unpadded convolution needs more than a
  few pixels, and a larger input only costs time."""
  shapes = _input_shapes(graph, options)
  if not oracle.unknown_dims(graph, shapes):
    return oracle.input_sets(graph, options.seed, shapes=shapes)
  failure = None
  for size in oracle.SIZES:
    sets = oracle.input_sets(graph, options.seed, size=size, shapes=shapes)
    try:
      for inputs in sets:
        original(inputs)
      return sets
    except (errors.InputError, errors.VerificationError) as e:
      failure = e
  raise type(failure)(f"{failure} (unknown input dims tried at sizes "
                      f"{', '.join(map(str, oracle.SIZES))})")


def _input_shapes(graph, options: Options) -> dict[str, tuple[int, ...]]:
  shapes = {}
  for name, dims in options.input_shapes:
    if not name:
      if len(graph.inputs) != 1:
        raise errors.UsageError(f"the model has {len(graph.inputs)} inputs; name the one each "
                                "--input_shape is for: NAME:D0,D1,...")
      name = graph.inputs[0]
    match = [t for t in graph.inputs if t == name or t.split(":")[0] == name]
    if not match:
      raise errors.UsageError(f"--input_shape names '{name}', which is not a model input; "
                              f"inputs: {', '.join(graph.inputs)}")
    known = graph.shape(match[0])
    if known is not None and (len(known) != len(dims) or any(
        k is not None and k != d for k, d in zip(known, dims))):
      raise errors.UsageError(f"--input_shape {list(dims)} does not fit input '{match[0]}' of "
                              f"shape {['?' if k is None else k for k in known]}")
    shapes[match[0]] = tuple(dims)
  return shapes


def _probes(graph, cut) -> list[str]:
  """Tensors the oracle compares besides the outputs: the computed inputs of the
  ops that produce them (the logits under a Softmax, say), which pruning leaves
  whole. An output squashed to 0 and 1 in float32 hides any difference; its
  input does not."""
  probes = []
  for out in graph.outputs:
    node = graph.producer(out)
    for t in (node.inputs if node is not None else ()):
      if (t not in graph.constants and t not in graph.outputs and t not in cut and
          t not in probes and graph.producer(t) is not None and
          np.issubdtype(np.dtype(graph.dtypes.get(t, "int32")), np.floating)):
        probes.append(t)
  return probes


def run_oracle(adapter, original, masked, pruned, graph, options: Options,
               cut=frozenset(), pruned_graph=None) -> oracle.Verification:
  """Runs the original, the masked original and the pruned model on the same
  seeded inputs, one model at a time (so that no two of them are in memory as
  runnable graphs at once); raises VerificationError (nothing is written) when
  they disagree. `masked` is the masked model, or its weight edits (an Edits that
  only changes constants: the original is run with them, and no masked copy of
  the model is made). The views' constants are handed to the runners, which feed
  the large weights from them instead of decoding another copy."""
  probes = _probes(graph, cut)
  masked_arrays, in_place = None, None
  if isinstance(masked, slicing.InPlaceMask):
    in_place, masked_arrays, masked = masked, graph.constants, original
  elif isinstance(masked, Edits):
    masked_arrays = collections.ChainMap(dict(masked.constants), graph.constants)
    masked = original
  runs = (("original", original, graph.constants), ("masked original", masked, masked_arrays),
          ("pruned", pruned, pruned_graph.constants if pruned_graph is not None else None))
  outputs, sets = [], None
  for what, model, arrays in runs:
    borrowed = in_place is not None and what == "masked original"
    runner = saved = None
    try:
      if borrowed:
        saved = in_place.zero(graph.constants)
      runner = _Checked(what, lambda m, a=arrays: adapter.Runner(m, probes, optimize=False,
                                                                 arrays=a), model)
      if sets is None:
        sets = oracle_inputs(graph, runner, options)
      outputs.append([runner(inputs) for inputs in sets])
    finally:
      if runner is not None:
        runner.close()
      del runner
      if borrowed:
        # The view's arrays get their values back: from the file zero() saved them
        # to, else from the model's own constants.
        in_place.restore(graph.constants, saved,
                         lambda: adapter.constants(original, in_place.cuts))
    if what == "original":
      for out in outputs[0]:
        oracle.check_finite(out)
  verification = oracle.compare(*outputs, sets, options.tolerance, options.seed)
  if not verification.passed:
    raise errors.VerificationError(
        f"verification failed: pruned differs from the masked original by "
        f"{verification.max_rel_diff:.3g} (relative; tolerance {options.tolerance:g}); "
        "nothing written")
  return verification


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
  tf_run = _Checked("pruned", tf_adapter.Runner, pruned)
  run = None
  try:
    run = _Checked(f"exported {what}", target.Runner, exported)
    max_abs = max_rel = 0.0
    for inputs in oracle_inputs(graph, tf_run, dataclasses.replace(options,
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


def kept_positions(analysis: groups_lib.Analysis, plan: plan_lib.Plan) -> dict[str, np.ndarray]:
  """For every tensor whose channels the plan cuts: the positions it keeps."""
  gone = analysis.removed_elements(plan.removed_units())
  out = {}
  for tensor, dim in analysis.dims.items():
    cut = gone[dim.units]
    if cut.any():
      out[tensor] = np.flatnonzero(~cut)
  return out


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
  pruned_view = validated_view(adapter, pruned)
  verification, verify_s = None, 0.0
  if options.verify:
    t0 = time.perf_counter()
    heap.give_back(weight_bytes)
    masked = masked_model(adapter, prepared.model, prepared.analysis, plan)
    verification = run_oracle(adapter, prepared.model, masked, pruned, prepared.graph, options,
                              set(kept_positions(prepared.analysis, plan)), pruned_view)
    verify_s = time.perf_counter() - t0
  return pruned, pruned_view, verification, copies, verify_s


def validated_view(adapter, pruned: Any):
  """The pruned model's view: re-reading it runs the format's shape inference, which
  validates the rewrite (VerificationError when it fails)."""
  try:
    return adapter.to_view(pruned)
  except (ValueError, errors.InputError) as e:
    raise errors.VerificationError(f"the pruned graph is invalid ({str(e).splitlines()[0][:300]}); "
                                   "please report this model") from None


def masked_model(adapter, model: Any, analysis: groups_lib.Analysis, plan: plan_lib.Plan):
  """The oracle's masked original for a channel plan (masked_from). Where the adapter
  feeds a model's weights from the view's arrays and the masking only zeroes
  weights, the cuts themselves (slicing.InPlaceMask): run_oracle zeroes the view's
  arrays for the masked run and restores them from the model after it, so the
  masked weights take no memory of their own."""
  if getattr(adapter, "RUNS_WITH_WEIGHTS", False):
    in_place = slicing.in_place_mask(analysis, plan)
    if in_place is not None:
      return in_place
  return masked_from(adapter, model, slicing.build_edits(analysis, plan, slicing.MASK))


def masked_from(adapter, model: Any, masked: Edits):
  """The masking edits themselves where the adapter runs a model with its weights
  fed and only constants change (no masked copy of the model), else the masked
  model."""
  if (masked.new_constants or masked.rewires or masked.attrs or
      not getattr(adapter, "RUNS_WITH_WEIGHTS", False)):
    return adapter.apply_edits(model, masked)
  return masked


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


def _check_recovery(fmt: Format, options: Options) -> None:
  if options.steps < 1:
    raise errors.UsageError(f"--steps is {options.steps}; it must be at least 1")
  if options.recover is None:
    return
  if fmt.name != formats.TENSORFLOW:
    raise errors.UsageError("--recover trains TensorFlow graphs; for an ONNX deployment prune "
                            "the TensorFlow model with --out_format=onnx")
  if options.plan_in:
    raise errors.UsageError("--plan_in applies a fixed plan; it does not combine with --recover")
  if getattr(options.recover, "grows", False) and options.steps > 1:
    raise errors.UsageError("--recover=gap prunes in its own phases; leave --steps at 1")
  options.recover.check()


@dataclasses.dataclass
class _Pruned:
  """What pruning in increments produced."""
  model: Any
  view: Any
  plan: plan_lib.Plan                      # the kept channels, in the original's numbering
  verification: Optional[oracle.Verification]
  increments: list[dict]
  copies: list[dict]


def check_options(in_path: str, out_path: str, options: Options) -> allocation.Spec:
  """Every check that needs no model: paths, criterion, ratios, tolerance,
  recovery. Raises UsageError/InputError before any work."""
  _check_paths(in_path, out_path, options)
  if options.criterion not in importance.CRITERIA:
    raise errors.UsageError(f"unknown criterion '{options.criterion}'; choose one of "
                            f"{', '.join(importance.CRITERIA)}")
  spec = spec_of(options)
  if not (math.isfinite(options.tolerance) and options.tolerance >= 0):
    raise errors.UsageError(f"--tolerance is {options.tolerance}; give a finite relative "
                            "difference >= 0, e.g. 1e-4")
  _check_recovery(format_for(in_path), options)
  _check_mode(options)
  if options.allocation not in allocation.ALLOCATIONS:
    raise errors.UsageError(f"unknown --allocation '{options.allocation}'; choose one of "
                            f"{', '.join(allocation.ALLOCATIONS)}")
  given = [f"--target_{what}" for what in budget_lib.BUDGETS
           if getattr(options, f"target_{what}") is not None]
  if len(given) > 1:
    raise errors.UsageError(f"give one budget, not {' and '.join(given)}")
  budget = budget_lib.budget_of(options)
  if options.allocation == "latency" and budget is None:
    raise errors.UsageError("--allocation=latency takes a latency budget instead of --ratio: "
                            "give --target_speedup or --target_latency_ms")
  if budget is not None:
    what, value = budget
    if what == "speedup" and not (math.isfinite(value) and value > 1):
      raise errors.UsageError(f"--target_speedup={value:g}: give a speedup above 1 (e.g. 2 "
                              "for twice as fast as the original)")
    if what == "latency_ms" and not (math.isfinite(value) and value > 0):
      raise errors.UsageError(f"--target_latency_ms={value:g}: give a positive latency")
    if what not in budget_lib.MEASURED_BUDGETS and not (math.isfinite(value) and 0 < value < 1):
      raise errors.UsageError(f"--target_{what}={value:g}: give the fraction kept, "
                              "between 0 and 1 (e.g. 0.5 keeps half)")
    if options.allocation == "latency" and what not in budget_lib.MEASURED_BUDGETS:
      raise errors.UsageError(f"--allocation=latency takes a latency budget "
                              f"(--target_speedup or --target_latency_ms), not --target_{what}")
    if what in budget_lib.MEASURED_BUDGETS and options.latency is None:
      raise errors.UsageError(f"--target_{what} needs the benchmark that times candidates "
                              "(pipeline.Options.latency: a bench.latency.Probe)")
    if options.plan_in:
      raise errors.UsageError(f"--target_{budget[0]} chooses a plan; it does not combine with "
                              "--plan_in")
  if options.reconstruct is not None:
    reconstruct_lib.check(options.reconstruct)
  needs = [what for what, needed in (
      (f"--criterion={options.criterion}", options.criterion in importance.CALIBRATED),
      (f"--reconstruct={getattr(options.reconstruct, 'method', '')}",
       options.reconstruct is not None)) if needed]
  if needs and options.calibration is None:
    raise errors.UsageError(f"{' and '.join(needs)} need{'s' if len(needs) == 1 else ''} "
                            "calibration samples: give --calibration_data (images or a .npz "
                            "of inputs; no labels needed)")
  if options.quantize is not None:
    _check_quantize(out_path, options)
  if options.calibration is not None:
    options.calibration.check()
  if options.criterion == "taylor":
    if format_for(in_path).name != formats.TENSORFLOW:
      raise errors.UsageError("--criterion=taylor needs gradients, which this tool takes from "
                              "TensorFlow; for an ONNX model use activation, apoz or wanda")
    if options.taylor is None:
      raise errors.UsageError("--criterion=taylor: no gradient code handed in "
                              "(pipeline.Options.taylor)")
  return spec


# Ops of a model that is quantized already (QDQ pairs, ONNX's integer operators).
QUANTIZED_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear",
                           "QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger"})


def _check_not_quantized(prepared: Prepared, options: Options) -> None:
  """A quantized input is pruned (its int8 codes cut), not quantized again or
  reconstructed: both need the float model."""
  found = sorted({n.op for n in prepared.graph.nodes} & QUANTIZED_OPS)
  if not found:
    return
  for asked, flag in ((options.quantize is not None, "--quantize"),
                      (options.reconstruct is not None, "--reconstruct")):
    if asked:
      raise errors.UsageError(
          f"{flag}: the input is already quantized ({', '.join(found)}); graph_prune prunes "
          "it as it is (int8 codes cut with their scales); for this, prune the float model "
          "and quantize it after (--quantize=int8)")


def _check_quantize(out_path: str, options: Options) -> None:
  scheme = options.quantize.scheme
  quantize_lib.check(options.quantize)
  out = formats.name_of(out_path)
  if out == formats.TENSORFLOW and scheme not in quantize_options.TF_SCHEMES:
    raise errors.UsageError(f"--quantize={scheme} writes ONNX or LiteRT models (a GraphDef or "
                            f"SavedModel takes {' or '.join(quantize_options.TF_SCHEMES)}); "
                            "give --out_format=onnx or --out_format=tflite")
  if out == formats.ONNX and scheme == "bfloat16":
    raise errors.UsageError("--quantize=bfloat16 is for TensorFlow GraphDef and SavedModel "
                            "outputs run by XLA; for ONNX use float16 or int8")
  if out == formats.TFLITE and scheme not in ("int8", "float16"):
    raise errors.UsageError(f"--out_format=tflite takes --quantize=int8 or float16, not {scheme} "
                            "(codebook weights are written for ONNX outputs)")
  if options.calibration is None:
    raise errors.UsageError(f"--quantize={scheme} needs calibration samples "
                            "(int8 ranges, and the measurement against the float model): give "
                            "--calibration_data")


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
  _check_not_quantized(prepared, options)
  samples = None
  if options.calibration is not None and (options.reconstruct is not None or
                                          options.criterion in importance.CALIBRATED or
                                          options.mode == "mixed"):
    samples = options.calibration.load(prepared.format, prepared.graph)
  timings["load_s"] = time.perf_counter() - t0
  measured: dict = {}
  if options.mode == "layer":
    result, layers = prune_layers(prepared, options, timings, measured)
    doc = assemble_report(in_path, out_path, prepared, result, spec, options, timings,
                          measured, layers=layers)
    return write_outputs(prepared, result, out_path, doc, options, samples)
  if options.mode == "mixed":
    without, result, layers = prune_mixed(prepared, options, timings, measured, samples)
    # The groups and the plan are those of the model without the layers; the
    # figures before are the original's.
    doc = assemble_report(in_path, out_path, dataclasses.replace(without, graph=prepared.graph),
                          result, spec, options, timings, measured, layers=layers)
    return write_outputs(prepared, result, out_path, doc, options, samples)
  plan = make_plan(prepared, options, samples, measured)
  removes = any(g.removed for g in plan.groups)
  if removes and getattr(options.recover, "grows", False):
    result = grow_and_prune(prepared, plan, options, timings, samples)
  elif removes:
    result = prune_in_increments(prepared, plan, options, timings, samples)
  else:
    # Nothing removed (--ratio=0, or rounding keeps every channel): the output is
    # the input as it was read, not its normalised form; nothing to verify.
    result = _Pruned(model_ref(in_path, options).load(), prepared.graph, plan, None, [], [])
  doc = assemble_report(in_path, out_path, prepared, result, spec, options, timings, measured)
  return write_outputs(prepared, result, out_path, doc, options, samples)


MODES = ("filter", "layer", "mixed")
# Recovery after removing blocks: training against the original (no channel map needed).
LAYER_RECOVERY = ("distill", "finetune")


def _check_mode(options: Options) -> None:
  if options.mode not in MODES:
    raise errors.UsageError(f"unknown --mode '{options.mode}'; choose filter, layer or mixed")
  if options.mode == "filter":
    return
  method = getattr(getattr(options.recover, "options", None), "method", None)
  mixed = options.mode == "mixed"
  other = [flag for flag, given in (
      ("--plan_in", bool(options.plan_in)),
      ("--steps", options.steps != 1),
      (f"--recover={method}", options.recover is not None and method not in LAYER_RECOVERY),
      ("--reconstruct", options.reconstruct is not None),
      (f"--allocation={options.allocation}", options.allocation != "uniform" and not mixed),
      ("--layer_ratio/--exclude", bool(options.overrides or options.exclude))) if given]
  if other:
    what = ("chooses layers and filters together for a budget" if mixed else
            "removes whole residual blocks and layers (--ratio of them, or as many as a "
            "budget needs)")
    raise errors.UsageError(f"--mode={options.mode} {what}; {', '.join(other)} with it is not "
                            "built yet")
  if mixed and budget_lib.budget_of(options) is None:
    raise errors.UsageError("--mode=mixed chooses layers and filters together for a budget: "
                            "give --target_speedup, --target_latency_ms, --target_flops or "
                            "--target_params instead of --ratio")
  if mixed and options.calibration is None:
    raise errors.UsageError("--mode=mixed compares its candidates by how far their outputs "
                            "move from the original's on calibration samples: give "
                            "--calibration_data (images or a .npz of inputs; no labels needed)")


def _removable(prepared: Prepared) -> blocks_lib.Found:
  found = blocks_lib.find(prepared.graph, prepared.format.ops)
  if not found.blocks:
    why = "; ".join(f"{add}: {reason}" for add, reason in found.skipped[:3])
    raise errors.NothingToPruneError(
        "--mode=layer: nothing removable: no same-shape residual block and no layer that can "
        "be the identity" + (f" ({why})" if why else ""))
  return found


def prune_layers(prepared: Prepared, options: Options, timings: dict[str, float],
                 measured: Optional[dict] = None) -> tuple[_Pruned, dict]:
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
  return (_Pruned(pruned, pruned_view, empty, verification, increments, []),
          _layers_doc(found, ranked, chosen))


def _remove_checked(prepared: Prepared, chosen: Sequence[blocks_lib.Block], options: Options,
                    timings: dict[str, float], t0: float):
  """The model without `chosen`, its validated view, and the oracle's verification
  against the original with the removed branches zeroed and the removed layers the
  identity (None with --noverify)."""
  graph, adapter = prepared.graph, prepared.format.adapter
  edits = layers_lib.layer_edits(graph, chosen)
  pruned = adapter.apply_edits(prepared.model, edits)
  pruned_view = validated_view(adapter, pruned)
  timings["plan_and_rewrite_s"] += time.perf_counter() - t0
  if not options.verify:
    return pruned, pruned_view, None
  t1 = time.perf_counter()
  values = blocks_lib.masked_constants(graph, prepared.format.ops, chosen)
  # A zeroed branch is recorded as a mask that cuts every channel, so that a
  # quantized weight is zeroed in its codes (they become the zero point).
  zeroed = {c for b in chosen if b.kind == blocks_lib.BLOCK for c in b.masked}
  masked = masked_from(adapter, prepared.model, Edits(values, {}, (), selections={
      c: (slicing.MASK, ((0, np.zeros(values[c].shape[0], bool)),)) for c in zeroed
      if np.ndim(values[c])}))
  # The tensors that went are not compared (a removed layer may have fed the outputs).
  gone = frozenset(t for name in edits.drop for t in graph.node(name).outputs)
  verification = run_oracle(adapter, prepared.model, masked, pruned, graph, options, gone,
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


def prune_mixed(prepared: Prepared, options: Options, timings: dict[str, float],
                measured: dict, samples) -> tuple[Prepared, _Pruned, dict]:
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
  give back, not a proof of accuracy. The winner is removed and
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
        plan = make_plan(prep_k, opts_k, samples)
      except (errors.UsageError, errors.NothingToPruneError) as e:
        last_error = e
        tries.append(dict(try_doc, error=str(e)))
        continue
    pruned = rewrite(prep_k, plan) if any(g.removed for g in plan.groups) else prep_k.model
    view = adapter.to_view(pruned)
    make = lambda p=pruned, v=view: activations.runner(adapter, p, (), v.constants)
    lost = agreement.probe_error(ref_fit, agreement.outputs(make, fit, 64, fixed), ref_held,
                                 agreement.outputs(make, held, 64, fixed))
    try_doc.update(groups_cut=sum(bool(g.removed) for g in plan.groups),
                   output_lost=round(lost, 6))
    tries.append(try_doc)
    candidates.append((lost, k, prep_k, plan))
    logging.info("mixed: %d layers removed, %d groups cut: output lost %.4f", k,
                 try_doc["groups_cut"], lost)
    del pruned, view, make
  if not candidates:
    raise errors.UsageError(f"--target_{what}={budget_lib.budget_of(options)[1]:g} "
                            f"cannot be met by --mode=mixed: with the {counts[-1]} removable "
                            f"layers and blocks removed, the filters' budget: {last_error}")
  _, k, prep_k, plan = min(candidates, key=lambda c: (c[0], c[1]))
  del candidates
  timings["plan_and_rewrite_s"] += time.perf_counter() - t0
  chosen = ranked[:k]
  verifications = {}
  if k:
    _, _, verifications["layers"] = _remove_checked(prepared, chosen, options, timings,
                                                    time.perf_counter())
  if any(g.removed for g in plan.groups):
    result = prune_in_increments(prep_k, plan, dataclasses.replace(options, recover=None),
                                 timings)
  else:   # the layers alone meet the budget: their check is the model's
    result = _Pruned(prep_k.model, prep_k.graph, plan, verifications.get("layers"), [], [])
  if timed:
    measured.update(budget_lib.measured_doc(session.measure(result.model), session,
                                            options.latency))
  layers = _layers_doc(found, ranked, chosen, mode="mixed")
  layers.update(candidates=tries, chosen_by="output_lost: the residual of the best affine "
                "map from the candidate's outputs to the original's (fitted on calibration "
                "samples, measured on held-out ones), relative to the original's spread; "
                "before recovery",
                layers_verify=dataclasses.asdict(verifications["layers"])
                if verifications.get("layers") else None)
  if options.recover is not None:
    model, view, increment = _recover_whole(prepared, result.model, options, timings)
    result = dataclasses.replace(result, model=model, view=view,
                                 increments=result.increments + [increment])
  return prep_k, result, layers


def prune_in_increments(prepared: Prepared, plan: plan_lib.Plan, options: Options,
                        timings: dict[str, float], samples=None) -> _Pruned:
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
    for tensor, positions in kept_positions(current.analysis, step_plan).items():
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
      pruned, increment["recovery"] = options.recover(prepared.model, pruned, tensor_keep, ckpt)
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
  return _Pruned(pruned, pruned_view, final_plan, worst, increments, copies)


def grow_and_prune(prepared: Prepared, plan: plan_lib.Plan, options: Options,
                   timings: dict[str, float], samples=None) -> _Pruned:
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


def assemble_report(in_path: str, out_path: str, prepared: Prepared, result: _Pruned,
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


def write_outputs(prepared: Prepared, result: _Pruned, out_path: str, doc: report_lib.Report,
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
          prepared.format, model, graph, format_for(out_path), converted, samples,
          options.quantize, {"tool": "tf.lite.TFLiteConverter (float32 inputs and outputs)"})
      doc = dataclasses.replace(doc, quantization=quantization)
    model, adapter = converted, format_for(out_path).adapter
  elif options.out_format == "onnx" and prepared.format.name != formats.ONNX:
    model, export = _export(adapter, model, prepared.graph, options)
    doc = dataclasses.replace(doc, export=export)
    adapter = format_for(out_path).adapter
  if options.quantize is not None and options.out_format != "tflite":
    fmt = format_for(out_path)
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
