"""Trains and exports a built-in model (graph_prune/zoo/default_model.py).

  bazel run //tools:train_default                    # the default model, models/default
  bazel run //tools:train_default -- --arch=resnet   # the small ResNet, models/resnet
  PYTHONPATH=. .venv/bin/python tools/train_default.py   # the same without Bazel

Writes into --out_dir (default: <workspace>/models/default, or models/resnet):
  fmnist_vgg_bn.pb               frozen GraphDef, input images:0 [N,28,28,1] in [0,1],
  (fmnist_resnet_bn.pb)          output logits:0 [N,10]
  fmnist_vgg_bn_savedmodel/      SavedModel, signature serving_default: images -> logits
  metrics.json, README.md        test accuracy of the Keras model and of both exports

--augment=flip,shift=2 flips and shifts the training images (a new draw every
batch; the ResNet reaches 93.16 % with it in 12 epochs, 92.68 % without).

With --gap_compare it trains the same architecture three ways to the same pruned
widths at the same number of steps (grow-and-prune from scratch, dense then
pruned, small from scratch; graph_prune/zoo/gap_scratch.py), prunes each for real
with graph_prune, and writes the comparison to --gap_report (the default model is
left alone):

  bazel run //tools:train_default -- --gap_compare --gap_ratio=0.75 --gap_report=gap.json
"""

import os
import sys

from absl import app
from absl import flags

from graph_prune import errors
from graph_prune.data import idx
from tools import cli

_DATA_DIR = flags.DEFINE_string(
    "data_dir", idx.FASHION_MNIST_DIR,
    "Directory with the Fashion-MNIST IDX files (*-idx?-ubyte.gz); the default is where "
    "the Debian package dataset-fashion-mnist installs them.")
_ARCH = flags.DEFINE_enum(
    "arch", "vgg", ["vgg", "resnet"], "vgg: the default model (models/default); resnet: the "
    "second built-in model, a small ResNet (models/resnet).")
_OUT_DIR = flags.DEFINE_string(
    "out_dir", None, "Output directory (default: <workspace>/models/default, or models/resnet "
    "with --arch=resnet). Model files already there are replaced, but only after the new "
    "ones pass verification.")
_EPOCHS = flags.DEFINE_integer("epochs", 3, "Training epochs.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 128, "Training batch size.")
_LEARNING_RATE = flags.DEFINE_float(
    "learning_rate", 3e-3, "Peak Adam learning rate (linear warm-up, then cosine decay to 0).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed for weights, shuffling and dropout.")
_DETERMINISTIC = flags.DEFINE_boolean(
    "deterministic", False,
    "Also call tf.config.experimental.enable_op_determinism().  Off by default: it about "
    "doubles the training time on CPU, and seeded CPU runs repeat without it in practice.")
_AUGMENT = flags.DEFINE_list(
    "augment", [], "Augment the training images: flip (mirrored left-right, probability 1/2), "
    "shift=N (moved by up to N pixels along each axis, edges mirrored); a new draw every "
    "batch. None by default (the committed models were trained without).")
_MIN_ACCURACY = flags.DEFINE_float(
    "min_accuracy", 0.92, "Fail, writing nothing, if the test accuracy is below this.")
_GAP_COMPARE = flags.DEFINE_boolean(
    "gap_compare", False, "Compare grow-and-prune from scratch with dense-then-prune and "
    "small-from-scratch training at the same steps (writes --gap_report only).")
_GAP_RATIO = flags.DEFINE_float("gap_ratio", 0.75, "--gap_compare: fraction of channels removed.")
_GAP_PARTS = flags.DEFINE_integer("gap_parts", 3, "--gap_compare: parts grown in turn.")
_GAP_PHASE_STEPS = flags.DEFINE_integer("gap_phase_steps", 150, "--gap_compare: steps per phase.")
_GAP_REPORT = flags.DEFINE_string("gap_report", "gap_compare.json",
                                  "--gap_compare: the results as JSON.")


def _default_out_dir(subdir):
  # `bazel run` starts us inside the runfiles tree, where __file__ points to; the
  # source tree is in BUILD_WORKSPACE_DIRECTORY then.
  root = os.environ.get("BUILD_WORKSPACE_DIRECTORY") or os.path.dirname(
      os.path.dirname(os.path.abspath(__file__)))
  return os.path.join(root, "models", subdir)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if _GAP_COMPARE.value:
    if _AUGMENT.value:
      print("train_default: error: --augment is not used by --gap_compare", file=sys.stderr)
      return 2
    return _gap_compare()
  from graph_prune.recover import augment as augment_lib  # pylint: disable=g-import-not-at-top
  from graph_prune.zoo import default_model  # pylint: disable=g-import-not-at-top
  try:
    augment = augment_lib.parse(_AUGMENT.value)
    out_dir = cli.path(_OUT_DIR.value) or _default_out_dir(
        default_model.ARCHS[_ARCH.value].out_dir)
    default_model.train(
        data_dir=cli.path(_DATA_DIR.value), out_dir=out_dir, epochs=_EPOCHS.value,
        batch_size=_BATCH_SIZE.value, learning_rate=_LEARNING_RATE.value, seed=_SEED.value,
        deterministic=_DETERMINISTIC.value, min_accuracy=_MIN_ACCURACY.value, arch=_ARCH.value,
        augment=augment)
  except errors.GraphPruneError as e:
    print(f"train_default: error: {e}", file=sys.stderr)
    return 2
  return 0


def _gap_compare():
  import tempfile  # pylint: disable=g-import-not-at-top
  from graph_prune import files  # pylint: disable=g-import-not-at-top
  from graph_prune.zoo import gap_scratch  # pylint: disable=g-import-not-at-top
  try:
    results = gap_scratch.compare(
        cli.path(_DATA_DIR.value), ratio=_GAP_RATIO.value, epochs=_EPOCHS.value,
        batch_size=_BATCH_SIZE.value, learning_rate=_LEARNING_RATE.value, seed=_SEED.value,
        parts=_GAP_PARTS.value, phase_steps=_GAP_PHASE_STEPS.value)
    rows = []
    for r in results:
      with tempfile.TemporaryDirectory() as work:
        r.update(gap_scratch.pruned_for_real(r.pop("model"), _GAP_RATIO.value, work))
      rows.append(r)
      print(f"{r['run']:20} test top-1 {r['test_accuracy']:.4f}  pruned for real: "
            f"{r['pruned_test_accuracy']:.4f}, {r['params_pruned']:,} parameters, "
            f"widths {r['widths_pruned']}")
    files.write_json(cli.path(_GAP_REPORT.value), rows, indent=2)
  except errors.GraphPruneError as e:
    print(f"train_default: error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  # TensorFlow's C++ start-up messages would drown the training log.
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  app.run(main)
