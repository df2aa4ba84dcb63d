"""Benchmarks a (pruned) model against its baseline under XLA or ONNX Runtime.

  bazel run //tools:bench -- --model=pruned.pb --baseline=model.pb \
      --batch_sizes=1,8,32 --report=bench.json

Prints a table on stdout and progress on stderr; --report writes the JSON
report (schema in graph_prune/bench/benchmark.py).
"""

import os
import sys

from absl import app
from absl import flags

from graph_prune import errors

_MODEL = flags.DEFINE_string(
    "model", None, "Model to measure: GraphDef (.pb/.pbtxt), SavedModel dir or .onnx file.")
_BASELINE = flags.DEFINE_string(
    "baseline", None, "Model to compare with (e.g. the unpruned one); run in alternation.")
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["1"], "Batch sizes, e.g. 1,8,32.")
_DEVICE = flags.DEFINE_string("device", "auto", "auto (TPU, GPU, else CPU), cpu, gpu[:N], tpu[:N].")
_XLA = flags.DEFINE_boolean("xla", True, "Compile TensorFlow models with XLA (jit_compile).")
_MAX_SECONDS = flags.DEFINE_float(
    "max_seconds", 10.0, "Time budget of the timed loop per model and batch size.")
_TARGET_RSE = flags.DEFINE_float(
    "target_rse", 0.01, "Stop once every median has this relative standard error.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed calls per model and batch size.")
_MIN_RUNS = flags.DEFINE_integer("min_runs", 5, "Timed calls per model that always run.")
_MEMORY = flags.DEFINE_boolean("memory", True, "Measure peak memory (a child process each).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the random inputs.")
_SIGNATURE = flags.DEFINE_string("signature", None, "SavedModel signature (serving_default).")
_INPUTS = flags.DEFINE_list("inputs", [], "GraphDef input tensors (default: placeholders).")
_OUTPUTS = flags.DEFINE_list("outputs", [], "GraphDef output tensors (default: sinks).")
_REPORT = flags.DEFINE_string("report", None, "Write the report as JSON here.")
_OVERWRITE = flags.DEFINE_boolean("overwrite", False, "Replace an existing --report.")

flags.mark_flag_as_required("model")


def _path(p):
  """Paths are relative to where `bazel run` was called from."""
  if p is None or os.path.isabs(p):
    return p
  return os.path.join(os.environ.get("BUILD_WORKING_DIRECTORY", ""), p)


def main(argv):
  del argv
  # Imported here so that flag errors and --help do not pay for importing numpy.
  from graph_prune.bench import benchmark  # pylint: disable=g-import-not-at-top
  from graph_prune.bench import timing  # pylint: disable=g-import-not-at-top
  try:
    try:
      settings = timing.Settings(warmup=_WARMUP.value, min_runs=_MIN_RUNS.value,
                                 max_seconds=_MAX_SECONDS.value, target_rse=_TARGET_RSE.value)
    except ValueError as e:
      raise errors.UsageError(f"{e} (--warmup, --min_runs, --max_seconds, --target_rse)"
                              ) from None
    options = benchmark.Options(
        model=_path(_MODEL.value), baseline=_path(_BASELINE.value),
        batch_sizes=benchmark.parse_batch_sizes(_BATCH_SIZES.value), device=_DEVICE.value,
        xla=_XLA.value, timing=settings, memory=_MEMORY.value, seed=_SEED.value,
        signature=_SIGNATURE.value, inputs=tuple(_INPUTS.value), outputs=tuple(_OUTPUTS.value),
        report=_path(_REPORT.value), overwrite=_OVERWRITE.value)
    doc = benchmark.run(options)
  except errors.GraphPruneError as e:
    print(f"bench: error: {e}", file=sys.stderr)
    return 2
  print(benchmark.text(doc))
  return 0


if __name__ == "__main__":
  app.run(main)
