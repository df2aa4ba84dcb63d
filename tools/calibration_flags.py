"""The calibration, reconstruction and quantization flags, shared by //tools:prune and
//tools:sweep.

Calibration samples feed the calibrated criteria (--criterion=activation, apoz,
wanda) and reconstruction (--reconstruct=bias or lsq); they are preprocessed with
the calling tool's --resize, --scale, --mean and --std.
"""

from absl import flags

CALIBRATION_DATA = flags.DEFINE_string(
    "calibration_data", None, "Unlabelled samples for calibrated criteria and "
    "--reconstruct: .npz (x; y not needed), TFRecords, class folders, IDX files or "
    "fashion-mnist:train.")
CALIBRATION_FORMAT = flags.DEFINE_string("calibration_format", "auto",
                                         "Format of --calibration_data: auto, npz, tfrecord, "
                                         "folder, idx.")
CALIBRATION_SPLIT = flags.DEFINE_string("calibration_split", "train",
                                        "IDX split (train or test) of an IDX directory.")
CALIBRATION_SAMPLES = flags.DEFINE_integer(
    "calibration_samples", 2048, "Calibration samples used (and the statistics of bn_recalibrate and "
    "--recover_batch_stats).")
CALIBRATION_HOLDOUT = flags.DEFINE_integer(
    "calibration_holdout", 500, "Further samples kept out of calibration; reconstruction is "
    "measured against the original on them (a fifth of the data when it has too few).")
RECONSTRUCT = flags.DEFINE_enum(
    "reconstruct", "none", ["none", "bias", "lsq"],
    "After each pruning increment, without gradient steps: fold the removed channels' mean "
    "contribution into the next layers' biases (bias), or re-fit the next layers' weights "
    "by ridge least squares on the original's activations (lsq).")
RECONSTRUCT_RIDGE = flags.DEFINE_float(
    "reconstruct_ridge", 1e-3, "lsq: ridge towards the sliced weights, relative to the mean "
    "input energy of each layer.")
RECONSTRUCT_ROWS = flags.DEFINE_integer(
    "reconstruct_rows", 1 << 17, "lsq: rows (output positions x samples) per layer; more are "
    "sampled evenly.")
QUANTIZE = flags.DEFINE_string(
    "quantize", "none", "After pruning and recovery, quantize the output: ONNX (an ONNX input, "
    "or --out_format=onnx) int8 (static QDQ, per-channel weights), float16, codebook8 or "
    "codebook4 (k-means weights, indices and a codebook); LiteRT (--out_format=tflite) int8 "
    "(full integer) or float16; none. Needs --calibration_data: the result is measured "
    "against the float model on the held-out samples.")
QUANTIZE_CALIBRATION = flags.DEFINE_string(
    "quantize_calibration", "minmax", "int8: activation ranges by minmax, percentile or entropy.")
CODEBOOK_FIT = flags.DEFINE_string(
    "codebook_fit", "outputs", "codebook8/codebook4: fit each layer's codebook to its outputs "
    "on the calibration samples, layer by layer with the layers before it quantized "
    "(outputs), or k-means of the weight values alone (kmeans).")
MIN_AGREEMENT = flags.DEFINE_float(
    "min_agreement", 0.99, "Quantization: the least top-1 agreement with the float model on "
    "the held-out samples; below it nothing is written (exit 2).")


def quantize():
  """quantize.Options from the flags, or None without --quantize."""
  if QUANTIZE.value == "none":
    return None
  from graph_prune.quantize import options  # pylint: disable=g-import-not-at-top
  return options.Options(QUANTIZE.value, QUANTIZE_CALIBRATION.value,
                         min_agreement=MIN_AGREEMENT.value, codebook_fit=CODEBOOK_FIT.value)


def calibration(cli, preprocess, data_dir):
  """calibration.samples.Spec from the flags, or None without --calibration_data;
  `preprocess` is called for the tool's preprocessing only when needed."""
  if not CALIBRATION_DATA.value:
    return None
  from graph_prune.calibration import samples  # pylint: disable=g-import-not-at-top
  return samples.Spec(cli.data_path(CALIBRATION_DATA.value), CALIBRATION_FORMAT.value,
                      data_dir, CALIBRATION_SPLIT.value, preprocess(),
                      CALIBRATION_SAMPLES.value, CALIBRATION_HOLDOUT.value)


def reconstruct(seed: int):
  """reconstruct.Options from the flags, or None without --reconstruct."""
  if RECONSTRUCT.value == "none":
    return None
  from graph_prune.reconstruct import reconstruct as lib  # pylint: disable=g-import-not-at-top
  return lib.Options(method=RECONSTRUCT.value, ridge=RECONSTRUCT_RIDGE.value,
                     max_rows=RECONSTRUCT_ROWS.value, seed=seed)


def taylor(criteria):
  """The taylor criterion's gradient code (TensorFlow), only when one of `criteria`
  asks for it (pipeline.Options.taylor)."""
  if "taylor" not in criteria:
    return None
  from graph_prune.recover import taylor as lib  # pylint: disable=g-import-not-at-top
  return lib.filter_scores
