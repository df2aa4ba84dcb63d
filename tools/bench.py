"""Benchmarks a (pruned) model against its baseline under XLA or ONNX Runtime.

  bazel run //tools:bench -- --model=pruned.pb --baseline=model.pb \
      --batch_sizes=1,8,32 --report=bench.json

Prints a table on stdout and progress on stderr; --report writes the JSON
report (schema in graph_prune/bench/benchmark.py).
"""

import sys

from absl import app
from absl import flags

from graph_prune import errors
from tools import cli

_BENCH = cli.BenchFlags()
flags.adopt_module_key_flags(cli)  # listed by --help with this tool's own
_MODEL = flags.DEFINE_string(
    "model", None, "Model to measure: GraphDef (.pb/.pbtxt), SavedModel dir or .onnx file.")
_BASELINE = flags.DEFINE_string(
    "baseline", None, "Model to compare with (e.g. the unpruned one); run in alternation.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the random inputs.")
_SIGNATURE = flags.DEFINE_string("signature", None, "SavedModel signature (serving_default).")
_INPUTS = flags.DEFINE_list("inputs", [], "GraphDef input tensors (default: placeholders).")
_OUTPUTS = flags.DEFINE_list("outputs", [], "GraphDef output tensors (default: sinks).")
_REPORT = flags.DEFINE_string("report", None, "Write the report as JSON here.")
_OVERWRITE = flags.DEFINE_boolean("overwrite", False, "Replace an existing --report.")

flags.mark_flag_as_required("model")


def main(argv):
  del argv
  # Imported here so that flag errors and --help do not pay for importing numpy.
  from graph_prune.bench import benchmark  # pylint: disable=g-import-not-at-top
  try:
    settings = _BENCH.timing()
    options = benchmark.Options(
        model=cli.path(_MODEL.value), baseline=cli.path(_BASELINE.value),
        batch_sizes=benchmark.parse_batch_sizes(_BENCH.batch_sizes.value),
        device=_BENCH.device.value, xla=_BENCH.xla.value, timing=settings,
        memory=_BENCH.memory.value, seed=_SEED.value,
        signature=_SIGNATURE.value, inputs=tuple(_INPUTS.value), outputs=tuple(_OUTPUTS.value),
        report=cli.path(_REPORT.value), overwrite=_OVERWRITE.value)
    doc = benchmark.run(options)
  except errors.GraphPruneError as e:
    print(f"bench: error: {e}", file=sys.stderr)
    return 2
  print(benchmark.text(doc))
  return 0


if __name__ == "__main__":
  app.run(main)
