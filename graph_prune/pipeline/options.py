"""The pipeline's options, and every check of them that needs no model (paths,
criterion, ratios, budgets, modes, recovery, quantization): bad requests are
refused before any work."""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Optional

from graph_prune import budget as budget_lib
from graph_prune import errors
from graph_prune import formats
from graph_prune import prepared as prepared_lib
from graph_prune.criteria import allocation
from graph_prune.criteria import importance
from graph_prune.quantize import options as quantize_options
from graph_prune.quantize import quantize as quantize_lib
from graph_prune.reconstruct import reconstruct as reconstruct_lib


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


def spec_of(options: Options) -> allocation.Spec:
  return allocation.Spec(options.ratio, options.round_to, options.overrides, options.exclude)


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
  probe = getattr(getattr(options.recover, "options", None), "probe_steps", -1)
  if probe != -1 and options.mode != "mixed":
    raise errors.UsageError(f"--recover_probe_steps scores the candidates of --mode=mixed; "
                            f"--mode={options.mode} has none")
  options.recover.check()


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


def check_not_quantized(prepared: prepared_lib.Prepared, options: Options) -> None:
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
