"""The main job: the built-in model pruned, its accuracy restored, evaluated and
benchmarked against the original; one summary block at the end
(graph_prune/zoo/main_job.py). `bash tools/run_default.sh` with no arguments runs it.

  bazel run //tools:main_job -- [--out_dir=out/default] [--distill_steps=600]
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging

from graph_prune import errors
from tools import cli

_OUT_DIR = flags.DEFINE_string("out_dir", "out/default", "Where the pruned model and the "
                               "reports go.")
_RATIO = flags.DEFINE_float("ratio", 0.5, "Fraction of the channels of every group removed.")
_CRITERION = flags.DEFINE_string("criterion", "activation", "Pruning criterion.")
_SAMPLES = flags.DEFINE_integer("calibration_samples", 2000,
                                "Unlabelled training images for reconstruction.")
_DISTILL = flags.DEFINE_integer("distill_steps", 600, "Distillation steps after reconstruction "
                                "(0: none).")
_SECONDS = flags.DEFINE_float("bench_seconds", 3.0, "Timing budget per model and batch size.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Fashion-MNIST IDX directory (default: the "
                                "Debian package's).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)   # the summary is the output
  from graph_prune.zoo import main_job  # pylint: disable=g-import-not-at-top
  try:
    summary = main_job.run(main_job.Settings(
        out_dir=cli.path(_OUT_DIR.value), ratio=_RATIO.value, criterion=_CRITERION.value,
        calibration_samples=_SAMPLES.value, distill_steps=_DISTILL.value,
        bench_seconds=_SECONDS.value, data_dir=cli.path(_DATA_DIR.value) or ""))
  except errors.GraphPruneError as e:
    print(f"main_job: error: {e}", file=sys.stderr)
    return 2
  print(main_job.text(summary))
  return 0


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  app.run(main)
