"""Prunes channels of a TensorFlow or ONNX model and writes a smaller model of the same kind.

  bazel run //tools:prune -- --in=model.pb --out=pruned.pb --ratio=0.5 --criterion=l1
"""

import os
import sys

from absl import app
from absl import flags

from graph_prune import errors

_IN = flags.DEFINE_string("in", None,
                          "Input: frozen GraphDef (.pb/.pbtxt), SavedModel dir, or .onnx file.")
_OUT = flags.DEFINE_string("out", None, "Output path; same format as the input.")
_RATIO = flags.DEFINE_float("ratio", 0.5, "Fraction of channels removed from each group, [0, 1).")
_CRITERION = flags.DEFINE_string("criterion", "l1", "l1, l2, bn_scale, fpgm or random.")
_ROUND_TO = flags.DEFINE_string(
    "round_to", "1", "Keep a multiple of this many channels, or 'auto': 128 on TPU, 8 on GPU, "
    "on CPU the multiple measured from a convolution's latency staircase (cached).")
_WIDTHS_CACHE = flags.DEFINE_string("widths_cache", None,
                                    "Latency table for --round_to=auto (default: user cache).")
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
                                  "'same' as the input, or 'onnx' (TensorFlow input, tf2onnx).")
_OPSET = flags.DEFINE_integer("opset", 17, "ONNX opset for --out_format=onnx.")

# Recovery after pruning (TensorFlow models).
_RECOVER = flags.DEFINE_enum(
    "recover", "none", ["none", "distill", "finetune", "bn_recalibrate"],
    "After pruning: distill from the original on unlabelled data, finetune on labels "
    "(optionally mixed with distillation), or bn_recalibrate (no gradient steps).")
_STEPS = flags.DEFINE_integer("steps", 1, "Prune in this many increments, recovering after "
                              "each (geometric schedule to --ratio).")
_RECOVER_DATA = flags.DEFINE_string(
    "recover_data", None, "Recovery data: .npz (x, and y for finetune), TFRecords, class "
    "folders, IDX files or fashion-mnist:train.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Fashion-MNIST directory for "
                                "fashion-mnist:SPLIT (default: the Debian package's).")
_SPLIT = flags.DEFINE_string("split", "train", "IDX split (train or test) of an IDX directory.")
_RESIZE = flags.DEFINE_string("resize", None, "H,W: resize images (bilinear) to this size.")
_SCALE = flags.DEFINE_string("scale", "1", "Multiply pixels by this, e.g. 1/255.")
_MEAN = flags.DEFINE_list("mean", [], "Subtract per channel (after --scale): one value or C.")
_STD = flags.DEFINE_list("std", [], "Then divide per channel: one value or C.")
_RECOVER_BATCH = flags.DEFINE_integer("recover_batch_size", 64,
                                      "Global batch size of recovery training.")
_RECOVER_STEPS = flags.DEFINE_integer("recover_train_steps", 1000,
                                      "Gradient steps of each recovery.")
_LEARNING_RATE = flags.DEFINE_float("learning_rate", 1e-3, "Peak Adam learning rate "
                                    "(linear warm-up, cosine decay).")
_TEMPERATURE = flags.DEFINE_float("temperature", 4.0, "Distillation temperature.")
_DISTILL_WEIGHT = flags.DEFINE_float("distill_weight", 0.0,
                                     "finetune: weight of the distillation term, [0, 1].")
_CALIBRATION = flags.DEFINE_integer("calibration_samples", 2048,
                                    "bn_recalibrate: samples the statistics come from.")
_HOLDOUT = flags.DEFINE_integer("holdout_samples", 2000, "Samples kept out of recovery; "
                                "agreement with the original is reported on them.")
_STRATEGY = flags.DEFINE_enum("strategy", "default", ["default", "mirrored", "tpu"],
                              "tf.distribute strategy of recovery training: one device, "
                              "mirrored over local GPUs, or TPU.")
_CHECKPOINT_DIR = flags.DEFINE_string(
    "checkpoint_dir", None, "Recovery checkpoints; a re-run with the same flags resumes there.")
_CHECKPOINT_EVERY = flags.DEFINE_integer("checkpoint_every", 200, "Steps between checkpoints.")
_LOG_EVERY = flags.DEFINE_integer("log_every", 100, "Steps between progress lines.")
_RECOVER_OUTPUT = flags.DEFINE_string("recover_output", None, "Output with the class scores "
                                      "(default: the first; a Softmax's input is used).")

flags.mark_flags_as_required(["in", "out"])


def _path(p):
  """Paths are relative to where `bazel run` was called from."""
  if p is None or os.path.isabs(p):
    return p
  return os.path.join(os.environ.get("BUILD_WORKING_DIRECTORY", ""), p)


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


def _round_to(value):
  """An int, or 'auto' resolved on the present device; returns (multiple, how)."""
  if value != "auto":
    try:
      return int(value), ""
    except ValueError:
      raise errors.UsageError(f"--round_to must be a positive integer or 'auto', not "
                              f"'{value}'") from None
  from graph_prune.bench import runners  # pylint: disable=g-import-not-at-top
  from graph_prune.bench import widths  # pylint: disable=g-import-not-at-top
  kind = runners.resolve_device("auto", "graphdef").kind
  return widths.auto_round_to(kind, widths.Cache(_path(_WIDTHS_CACHE.value)
                                                 or widths.default_cache()))


def _recover_options():
  """recover.Options from the flags, or None without --recover."""
  if _RECOVER.value == "none":
    return None
  from graph_prune.data import preprocess  # pylint: disable=g-import-not-at-top
  from graph_prune.recover import recover  # pylint: disable=g-import-not-at-top
  return recover.Options(
      method=_RECOVER.value, data=_path(_RECOVER_DATA.value) or "",
      data_dir=_path(_DATA_DIR.value), split=_SPLIT.value,
      preprocess=preprocess.Preprocess(
          resize=preprocess.parse_resize(_RESIZE.value),
          scale=preprocess.parse_scale(_SCALE.value),
          mean=preprocess.parse_floats(_MEAN.value, "mean"),
          std=preprocess.parse_floats(_STD.value, "std")),
      batch_size=_RECOVER_BATCH.value, train_steps=_RECOVER_STEPS.value,
      learning_rate=_LEARNING_RATE.value, temperature=_TEMPERATURE.value,
      distill_weight=_DISTILL_WEIGHT.value, calibration_samples=_CALIBRATION.value,
      holdout_samples=_HOLDOUT.value, strategy=_STRATEGY.value,
      checkpoint_dir=_path(_CHECKPOINT_DIR.value), checkpoint_every=_CHECKPOINT_EVERY.value,
      log_every=_LOG_EVERY.value, seed=_SEED.value, output=_RECOVER_OUTPUT.value)


def main(argv):
  del argv
  # Imported here so that flag errors and --help do not pay for importing TensorFlow.
  from graph_prune import pipeline  # pylint: disable=g-import-not-at-top
  from graph_prune import report  # pylint: disable=g-import-not-at-top
  try:
    round_to, round_to_how = _round_to(_ROUND_TO.value)
    options = pipeline.Options(
        ratio=_RATIO.value, criterion=_CRITERION.value, round_to=round_to,
        round_to_how=round_to_how,
        overrides=_overrides(_LAYER_RATIO.value), exclude=tuple(_EXCLUDE.value),
        seed=_SEED.value, plan_in=_path(_PLAN_IN.value), plan_out=_path(_PLAN_OUT.value),
        report=_path(_REPORT.value), verify=_VERIFY.value, tolerance=_TOLERANCE.value,
        signature=_SIGNATURE.value, inputs=tuple(_INPUTS.value), outputs=tuple(_OUTPUTS.value),
        overwrite=_OVERWRITE.value, out_format=_OUT_FORMAT.value, opset=_OPSET.value,
        steps=_STEPS.value, recover=_recover_options())
    doc = pipeline.prune(_path(flags.FLAGS["in"].value), _path(_OUT.value), options)
  except errors.GraphPruneError as e:
    print(f"prune: error: {e}", file=sys.stderr)
    return 2
  print(report.text(doc))
  return 0


if __name__ == "__main__":
  app.run(main)
