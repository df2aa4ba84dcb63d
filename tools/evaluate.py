"""Top-1/top-5 accuracy of a TensorFlow or ONNX classifier on labelled data, and its
agreement with a reference model.

  bazel run //tools:evaluate -- --model=models/default/fmnist_vgg_bn.pb \\
      --data=fashion-mnist:test --scale=1/255 --report=eval.json
  bazel run //tools:evaluate -- --model=pruned.onnx --reference=model.pb \\
      --data=val.tfrecord --resize=224,224 --scale=1/255 --mean=0.485,0.456,0.406 \\
      --std=0.229,0.224,0.225

Data: a .npz file (arrays x, y), TFRecord files of encoded images with integer labels,
a folder with one sub-folder per class, or IDX files ('fashion-mnist:test' reads the
Debian package dataset-fashion-mnist). Images are given to the model as stored unless
--resize/--scale/--mean/--std say otherwise.
"""

import sys

from absl import app
from absl import flags

from graph_prune import errors
from tools import cli

_MODEL = flags.DEFINE_string("model", None,
                             "Model: frozen GraphDef (.pb/.pbtxt), SavedModel dir, or .onnx.")
_DATA = flags.DEFINE_string(
    "data", None, "Labelled data: .npz (x, y), TFRecord file/glob/dir, class-folder dir, IDX "
    "dir or images file, or fashion-mnist:test / fashion-mnist:train.")
_REPORT = flags.DEFINE_string("report", None, "Write the report as JSON here.")
_REFERENCE = flags.DEFINE_string("reference", None,
                                 "Reference model; the report gives the agreement with it.")
_DATA_FORMAT = flags.DEFINE_enum("data_format", "auto", ["auto", "npz", "tfrecord", "folder",
                                                         "idx"], "Format of --data.")
_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "Fashion-MNIST IDX directory for the fashion-mnist:SPLIT shorthand "
    "(default /usr/share/datasets/fashion-mnist).")
_SPLIT = flags.DEFINE_string("split", "test", "IDX split (train or test) of an IDX directory.")
_IMAGE_KEY = flags.DEFINE_string("image_key", "image/encoded", "TFRecord feature: the image.")
_LABEL_KEY = flags.DEFINE_string("label_key", "image/class/label",
                                 "TFRecord feature: the integer label.")
_RESIZE = flags.DEFINE_string("resize", None, "H,W: resize images (bilinear) to this size.")
_SCALE = flags.DEFINE_string("scale", "1", "Multiply pixels by this, e.g. 1/255.")
_MEAN = flags.DEFINE_list("mean", [], "Subtract per channel (after --scale): one value or C.")
_STD = flags.DEFINE_list("std", [], "Then divide per channel: one value or C.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 256, "Samples per batch.")
_MAX_SAMPLES = flags.DEFINE_integer("max_samples", 0, "Evaluate only the first N (0: all).")
_SIGNATURE = flags.DEFINE_string("signature", None, "SavedModel signature (serving_default).")
_INPUT = flags.DEFINE_string("input", None, "Input tensor fed with samples (default: the only "
                             "input).")
_OUTPUT = flags.DEFINE_string("output", None, "Output with the class scores: tensor name or "
                              "SavedModel output key (default: the only output).")
_LAYOUT = flags.DEFINE_enum("layout", "auto", ["auto", "NHWC", "NCHW"],
                            "Layout of a rank-4 model input (auto: NHWC for TensorFlow; ONNX "
                            "from the first op reading it).")
_REFERENCE_SIGNATURE = flags.DEFINE_string("reference_signature", None,
                                           "SavedModel signature of --reference.")
_REFERENCE_OUTPUT = flags.DEFINE_string("reference_output", None,
                                        "Output of --reference with the class scores.")

flags.mark_flags_as_required(["model", "data"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  # Imported here so that flag errors and --help do not pay for importing TensorFlow.
  from graph_prune.data import preprocess  # pylint: disable=g-import-not-at-top
  from graph_prune.evaluate import evaluate  # pylint: disable=g-import-not-at-top
  try:
    reference = None
    if _REFERENCE.value:
      reference = evaluate.ModelSpec(cli.path(_REFERENCE.value),
                                     signature=_REFERENCE_SIGNATURE.value,
                                     output=_REFERENCE_OUTPUT.value)
    options = evaluate.Options(
        reference=reference, report=cli.path(_REPORT.value), data_format=_DATA_FORMAT.value,
        data_dir=cli.path(_DATA_DIR.value), split=_SPLIT.value, image_key=_IMAGE_KEY.value,
        label_key=_LABEL_KEY.value,
        preprocess=preprocess.Preprocess(
            resize=preprocess.parse_resize(_RESIZE.value),
            scale=preprocess.parse_scale(_SCALE.value),
            mean=preprocess.parse_floats(_MEAN.value, "mean"),
            std=preprocess.parse_floats(_STD.value, "std")),
        batch_size=_BATCH_SIZE.value, max_samples=_MAX_SAMPLES.value)
    model = evaluate.ModelSpec(cli.path(_MODEL.value), signature=_SIGNATURE.value,
                               input=_INPUT.value, output=_OUTPUT.value, layout=_LAYOUT.value)
    doc = evaluate.evaluate(model, cli.data_path(_DATA.value), options)
  except errors.GraphPruneError as e:
    print(f"evaluate: error: {e}", file=sys.stderr)
    return 2
  print(evaluate.text(doc))
  return 0


if __name__ == "__main__":
  app.run(main)
