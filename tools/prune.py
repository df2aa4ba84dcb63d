"""Prunes channels of a TensorFlow or ONNX model and writes a smaller model of the same kind.

  bazel run //tools:prune -- --in=model.pb --out=pruned.pb --ratio=0.5 --criterion=l1
"""

import signal
import sys

from absl import app
from absl import flags
from absl import logging

from graph_prune import errors
from tools import calibration_flags
from tools import cli
from tools import recover_flags

_IN = flags.DEFINE_string("in", None,
                          "Input: frozen GraphDef (.pb/.pbtxt), SavedModel dir, or .onnx file.")
_OUT = flags.DEFINE_string("out", None, "Output path; same format as the input.")
_RATIO = flags.DEFINE_float("ratio", 0.5, "Fraction of channels removed from each group, [0, 1).")
_CRITERION = flags.DEFINE_string("criterion", "l1", "l1, l2, bn_scale, fpgm, random, or "
                                 "with --calibration_data activation, apoz, wanda or taylor "
                                 "(TensorFlow).")
_ALLOCATION = flags.DEFINE_string(
    "allocation", "uniform", "uniform (every group loses --ratio), global (one ranking of "
    "each group's scores over their mean across all groups; every group keeps at least a "
    "tenth of its channels) or latency (with --target_speedup or --target_latency_ms: every "
    "layer timed across its widths on this device, cached in --widths_cache; the widths "
    "losing least importance per millisecond saved, then measured and refined).")
_TARGET_FLOPS = flags.DEFINE_float(
    "target_flops", None, "A budget instead of --ratio: the fraction of FLOPs kept, e.g. 0.5; "
    "the least pruning that meets it (by --allocation) is found by bisection.")
_TARGET_PARAMS = flags.DEFINE_float(
    "target_params", None, "A budget instead of --ratio: the fraction of parameters kept.")
_TARGET_SPEEDUP = flags.DEFINE_float(
    "target_speedup", None, "A budget instead of --ratio: at least this measured speedup over "
    "the original (each candidate timed beside it on --device at the one --batch_sizes, with "
    "the benchmark flags); the least pruning that meets it is found by bisection.")
_TARGET_LATENCY_MS = flags.DEFINE_float(
    "target_latency_ms", None, "A budget instead of --ratio: at most this measured latency in "
    "milliseconds (timed as for --target_speedup).")
_MODE = flags.DEFINE_string(
    "mode", "filter", "filter: remove channels; layer: remove whole residual blocks (a branch "
    "added to its identity shortcut) and make plain same-shape layers the identity (these need "
    "--recover=distill after), --ratio of the removable ones or as many as a budget needs, the "
    "least important first; mixed: layers and filters together for a budget (needs "
    "--calibration_data: the candidate whose outputs move least wins).")
# The benchmark flags (as //tools:bench), for the latency budgets.
_BENCH = cli.BenchFlags()
_ROUND_TO = flags.DEFINE_string(
    "round_to", "1", "Keep a multiple of this many channels, or 'auto': 128 on TPU, 8 on GPU, "
    "on CPU the multiple measured from a convolution's latency staircase (cached).")
_WIDTHS_CACHE = flags.DEFINE_string(
    "widths_cache", None, "Latency tables for --round_to=auto and --allocation=latency "
    "(default: user cache).")
_LAYER_RATIO = flags.DEFINE_multi_string(
    "layer_ratio", [], "PATTERN=RATIO: ratio for groups with a source node matching the glob.")
_EXCLUDE = flags.DEFINE_multi_string("exclude", [], "Node-name glob; matching groups stay whole.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed for the random criterion and verification inputs.")
_PLAN_IN = flags.DEFINE_string("plan_in", None, "Apply this plan (JSON) instead of scoring.")
_PLAN_OUT = flags.DEFINE_string("plan_out", None, "Write the plan as JSON here.")
_REPORT = flags.DEFINE_string("report", None, "Write the report as JSON here.")
_VERIFY = flags.DEFINE_boolean("verify", True, "Check pruned == masked original before writing.")
_TOLERANCE = flags.DEFINE_float("tolerance", 1e-4, "Largest relative difference accepted.")
_SIGNATURE = flags.DEFINE_string("signature", None, "SavedModel signature (serving_default).")
_INPUTS = flags.DEFINE_list("inputs", [], "GraphDef input tensors (default: placeholders).")
_OUTPUTS = flags.DEFINE_list("outputs", [], "GraphDef output tensors (default: sinks).")
_OVERWRITE = flags.DEFINE_boolean("overwrite", False, "Replace existing output files.")
_OUT_FORMAT = flags.DEFINE_string("out_format", "same",
                                  "'same' as the input; for a TensorFlow input 'onnx' (tf2onnx) "
                                  "or 'tflite' (LiteRT, TensorFlow's TFLite converter).")
_OPSET = flags.DEFINE_integer("opset", 17, "ONNX opset for --out_format=onnx.")
_INPUT_SHAPE = flags.DEFINE_multi_string(
    "input_shape", [], "[NAME:]D0,D1,...: the shape of the verification inputs for an input "
    "with unknown dims (default: the batch 2, other dims the smallest of 8, 32, ... 512 at "
    "which the model runs).")

# Recovery after pruning (TensorFlow models): the --recover* flags are in recover_flags.
_STEPS = flags.DEFINE_integer("steps", 1, "Prune in this many increments, recovering after "
                              "each (geometric schedule to --ratio).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Fashion-MNIST directory for "
                                "fashion-mnist:SPLIT (default: the Debian package's).")
_RESIZE = flags.DEFINE_string("resize", None, "Recovery and calibration data: resize images "
                              "(bilinear) to H,W.")
_SCALE = flags.DEFINE_string("scale", "1", "Recovery and calibration data: multiply pixels by "
                             "this, e.g. 1/255.")
_MEAN = flags.DEFINE_list("mean", [], "Recovery and calibration data: subtract per channel "
                          "(after --scale).")
_STD = flags.DEFINE_list("std", [], "Recovery and calibration data: then divide per channel.")

flags.adopt_module_key_flags(recover_flags)  # listed by --help with this tool's own
flags.adopt_module_key_flags(calibration_flags)
flags.mark_flags_as_required(["in", "out"])


def _overrides(specs):
  out = []
  for spec in specs:
    pattern, sep, ratio = spec.rpartition("=")
    try:
      out.append((pattern, float(ratio)))
    except ValueError:
      sep = ""
    if not sep or not pattern:
      raise errors.UsageError(f"--layer_ratio '{spec}' is not PATTERN=RATIO, e.g. 'block1*=0.25'")
  return tuple(out)


def _input_shapes(specs):
  out = []
  for spec in specs:
    name, _, dims = spec.rpartition(":")
    try:
      shape = tuple(int(d) for d in dims.split(","))
    except ValueError:
      shape = ()
    if not shape or any(d < 1 for d in shape):
      raise errors.UsageError(f"--input_shape '{spec}' is not [NAME:]D0,D1,... with positive "
                              "dims, e.g. 'input:1,3,224,224'")
    out.append((name, shape))
  return tuple(out)


def _preprocess():
  from graph_prune.data import preprocess  # pylint: disable=g-import-not-at-top
  return preprocess.Preprocess(
      resize=preprocess.parse_resize(_RESIZE.value), scale=preprocess.parse_scale(_SCALE.value),
      mean=preprocess.parse_floats(_MEAN.value, "mean"),
      std=preprocess.parse_floats(_STD.value, "std"))


def _recovery():
  """The recovery step from the flags, or None without --recover."""
  options = recover_flags.options(cli, _preprocess(), cli.path(_DATA_DIR.value), _SEED.value)
  if options is None:
    return None
  from graph_prune.recover import recover  # pylint: disable=g-import-not-at-top
  return recover.Recovery(options)


def _latency_probe():
  """bench.latency.Probe from the benchmark flags, with a latency budget; else None."""
  if _TARGET_SPEEDUP.value is None and _TARGET_LATENCY_MS.value is None:
    return None
  from graph_prune.bench import benchmark  # pylint: disable=g-import-not-at-top
  from graph_prune.bench import latency  # pylint: disable=g-import-not-at-top
  sizes = benchmark.parse_batch_sizes(_BENCH.batch_sizes.value)
  if len(sizes) != 1:
    raise errors.UsageError("a latency budget is timed at one batch size; give one "
                            f"--batch_sizes, not {','.join(map(str, sizes))}")
  probe = latency.Probe(device=_BENCH.device.value, xla=_BENCH.xla.value, batch=sizes[0],
                        settings=_BENCH.timing(), seed=_SEED.value,
                        cache=cli.path(_WIDTHS_CACHE.value))
  latency.check(probe)
  return probe


def _interrupted(signum, frame):
  del frame
  raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv):
  del argv
  # SIGTERM unwinds like Ctrl-C, so that every write's clean-up runs: an
  # interrupted prune leaves neither an output nor a temporary file.
  signal.signal(signal.SIGTERM, _interrupted)
  # Imported here so that flag errors and --help do not pay for importing TensorFlow.
  from graph_prune import pipeline  # pylint: disable=g-import-not-at-top
  from graph_prune import report  # pylint: disable=g-import-not-at-top
  try:
    from graph_prune.bench import widths  # pylint: disable=g-import-not-at-top
    round_to, round_to_how = widths.resolve_round_to(_ROUND_TO.value,
                                                     cache=cli.path(_WIDTHS_CACHE.value))
    budgets = [f.value for f in (_TARGET_FLOPS, _TARGET_PARAMS, _TARGET_SPEEDUP,
                                 _TARGET_LATENCY_MS)]
    if flags.FLAGS["ratio"].present and any(b is not None for b in budgets):
      raise errors.UsageError("a budget (--target_flops, --target_params, --target_speedup, "
                              "--target_latency_ms) replaces --ratio; give one of them")
    options = pipeline.Options(
        ratio=_RATIO.value, allocation=_ALLOCATION.value, target_flops=_TARGET_FLOPS.value,
        target_params=_TARGET_PARAMS.value, target_speedup=_TARGET_SPEEDUP.value,
        target_latency_ms=_TARGET_LATENCY_MS.value, latency=_latency_probe(),
        mode=_MODE.value, criterion=_CRITERION.value, round_to=round_to,
        round_to_how=round_to_how,
        overrides=_overrides(_LAYER_RATIO.value), exclude=tuple(_EXCLUDE.value),
        seed=_SEED.value, plan_in=cli.path(_PLAN_IN.value), plan_out=cli.path(_PLAN_OUT.value),
        report=cli.path(_REPORT.value), verify=_VERIFY.value, tolerance=_TOLERANCE.value,
        signature=_SIGNATURE.value, inputs=tuple(_INPUTS.value), outputs=tuple(_OUTPUTS.value),
        overwrite=_OVERWRITE.value, out_format=_OUT_FORMAT.value, opset=_OPSET.value,
        steps=_STEPS.value, recover=_recovery(),
        input_shapes=_input_shapes(_INPUT_SHAPE.value),
        reconstruct=calibration_flags.reconstruct(_SEED.value),
        taylor=calibration_flags.taylor([_CRITERION.value]),
        quantize=calibration_flags.quantize(),
        calibration=calibration_flags.calibration(cli, _preprocess, cli.path(_DATA_DIR.value)))
    doc = pipeline.prune(cli.path(flags.FLAGS["in"].value), cli.path(_OUT.value), options)
  except errors.GraphPruneError as e:
    print(f"prune: error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt as e:
    print(f"prune: interrupted ({e or 'SIGINT'}); nothing written", file=sys.stderr)
    return 130
  except Exception as e:  # pylint: disable=broad-except  (one line, never a traceback wall)
    logging.debug("internal error", exc_info=True)
    first = (str(e).splitlines() or [""])[0][:300]
    print(f"prune: internal error: {type(e).__name__}: {first}; nothing was written. Please "
          "report it with the model (-v 1 shows where it happened)", file=sys.stderr)
    return 1
  print(report.text(doc))
  return 0


if __name__ == "__main__":
  app.run(main)
