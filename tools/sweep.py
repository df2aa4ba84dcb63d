"""Prunes a model at every ratio x criterion x round_to, verifies and benchmarks each
against the original (and, with --data, evaluates it); one row per run, plots at the end.

  bazel run //tools:sweep -- --in=model.pb --ratios=0.1,0.2,...,0.9 \\
      --criteria=l1,l2,bn_scale,fpgm,random --round_to=1,auto --batch_sizes=1,32 \\
      --out_dir=sweep_out [--data=fashion-mnist:test --scale=1/255]
  bazel run //tools:sweep -- --out_dir=sweep_out --plots_only

Writes out_dir/rows.jsonl and rows.csv (columns: graph_prune/sweep/rows.py),
sweep.json, models/, plots/*.png. Run the same command again to resume a killed
sweep; --flagfile=FILE reads the flags from a file. A progress line per run on
stderr, a summary on stdout.
"""

import dataclasses
import os
import sys

from absl import app
from absl import flags
from absl import logging

from graph_prune import errors
from tools import calibration_flags
from tools import cli
from tools import recover_flags

_BENCH = cli.BenchFlags()
flags.adopt_module_key_flags(cli)  # listed by --help with this tool's own
flags.adopt_module_key_flags(recover_flags)  # listed by --help with this tool's own
_RUNNER = flags.DEFINE_string(
    "runner", "local", "local (one run after the other here) or an Apache Beam runner: "
    "DirectRunner (this machine, --beam_options=--direct_num_workers=N,"
    "--direct_running_mode=multi_processing), FlinkRunner, SparkRunner, DataflowRunner, ...; "
    "runs are pruned, evaluated and recovered in parallel, then benchmarked one at a time.")
_BEAM_OPTIONS = flags.DEFINE_list("beam_options", [], "Beam pipeline options passed through, "
                                  "comma-separated (--name=value,...).")
flags.adopt_module_key_flags(calibration_flags)
_IN = flags.DEFINE_string("in", None,
                          "Input: frozen GraphDef (.pb/.pbtxt), SavedModel dir, or .onnx file.")
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Directory of the sweep (created if missing).")
_RATIOS = flags.DEFINE_list("ratios", ["0.1", "0.2", "...", "0.9"],
                            "Ratios; '...' continues the step up to the next value.")
_CRITERIA = flags.DEFINE_list("criteria", ["l1", "l2", "bn_scale", "fpgm", "random"],
                              "Criteria: l1, l2, bn_scale, fpgm, random.")
_ALLOCATIONS = flags.DEFINE_list(
    "allocations", ["uniform"], "How kept counts are chosen, a run each: uniform, global, "
    "latency (latency needs --target_speedups).")
_TARGET_SPEEDUPS = flags.DEFINE_list(
    "target_speedups", [], "Measured speedup budgets instead of --ratios, a run each (e.g. "
    "1.5,2,3): each plan timed beside the original at the first --batch_sizes, as "
    "//tools:prune --target_speedup does.")
_ROUND_TO = flags.DEFINE_list("round_to", ["1"],
                              "Channel multiples: positive integers and/or 'auto' (resolved "
                              "once per sweep, as //tools:prune does).")
_MEMORY_RUNS = flags.DEFINE_integer("memory_runs", 3, "Calls per memory measurement.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed for the random criterion and all random inputs.")
_TOLERANCE = flags.DEFINE_float("tolerance", 1e-4, "Verification: largest relative difference.")
_SIGNATURE = flags.DEFINE_string("signature", None, "SavedModel signature (serving_default).")
_INPUTS = flags.DEFINE_list("inputs", [], "GraphDef input tensors (default: placeholders).")
_OUTPUTS = flags.DEFINE_list("outputs", [], "GraphDef output tensors (default: sinks).")
_DATA = flags.DEFINE_string(
    "data", None, "Labelled data for accuracy columns (as //tools:evaluate): .npz, TFRecord, "
    "class folders, IDX, or fashion-mnist:test.")
_DATA_FORMAT = flags.DEFINE_enum("data_format", "auto", ["auto", "npz", "tfrecord", "folder",
                                                         "idx"], "Format of --data.")
_DATA_DIR = flags.DEFINE_string("data_dir", None,
                                "Fashion-MNIST IDX directory for fashion-mnist:SPLIT.")
_SPLIT = flags.DEFINE_string("split", "test", "IDX split of an IDX directory.")
_RESIZE = flags.DEFINE_string("resize", None, "H,W: resize images (bilinear) to this size.")
_SCALE = flags.DEFINE_string("scale", "1", "Multiply pixels by this, e.g. 1/255.")
_MEAN = flags.DEFINE_list("mean", [], "Subtract per channel (after --scale).")
_STD = flags.DEFINE_list("std", [], "Then divide per channel.")
_MAX_SAMPLES = flags.DEFINE_integer("max_samples", 0, "Evaluate the first N samples (0: all).")
_EVAL_BATCH_SIZE = flags.DEFINE_integer("eval_batch_size", 256, "Samples per evaluation batch.")
_KEEP_MODELS = flags.DEFINE_boolean("keep_models", True,
                                    "Keep out_dir/models/<key>.* after each run.")
_WIDTHS_CACHE = flags.DEFINE_string("widths_cache", None,
                                    "Latency table for --round_to=auto (default: user cache).")
_OVERWRITE = flags.DEFINE_boolean("overwrite", False,
                                  "Delete a sweep in --out_dir (its own files) and start over.")
_PLOTS_ONLY = flags.DEFINE_boolean("plots_only", False,
                                   "Only re-create out_dir/plots from out_dir/rows.jsonl.")

# --in is not marked required: --plots_only needs none.
flags.mark_flag_as_required("out_dir")


def _data():
  if not _DATA.value:
    return None
  from graph_prune.data import preprocess  # pylint: disable=g-import-not-at-top
  from graph_prune.sweep import config  # pylint: disable=g-import-not-at-top
  if _MAX_SAMPLES.value < 0 or _EVAL_BATCH_SIZE.value < 1:
    raise errors.UsageError("--max_samples must be >= 0 and --eval_batch_size >= 1")
  return config.Data(
      spec=cli.data_path(_DATA.value), data_format=_DATA_FORMAT.value,
      data_dir=cli.path(_DATA_DIR.value), split=_SPLIT.value,
      resize=preprocess.parse_resize(_RESIZE.value), scale=preprocess.parse_scale(_SCALE.value),
      mean=preprocess.parse_floats(_MEAN.value, "mean"),
      std=preprocess.parse_floats(_STD.value, "std"),
      max_samples=_MAX_SAMPLES.value, batch_size=_EVAL_BATCH_SIZE.value)


def _say(line):
  print(line, file=sys.stderr, flush=True)


def _progress(i, n, row, total_s):
  from graph_prune.sweep import sweep  # pylint: disable=g-import-not-at-top
  _say(sweep.progress_line(i, n, row, total_s))


def _latency_probe():
  """bench.latency.Probe for --target_speedups (the first batch size and the
  benchmark flags), else None; --ratios and --target_speedups are exclusive."""
  if not _TARGET_SPEEDUPS.value:
    return None
  if flags.FLAGS["ratios"].present:
    raise errors.UsageError("--target_speedups replace --ratios; give one of them")
  from graph_prune.bench import benchmark  # pylint: disable=g-import-not-at-top
  from graph_prune.bench import latency  # pylint: disable=g-import-not-at-top
  sizes = benchmark.parse_batch_sizes(_BENCH.batch_sizes.value)
  probe = latency.Probe(device=_BENCH.device.value, xla=_BENCH.xla.value, batch=sizes[0],
                        settings=_BENCH.timing(), seed=_SEED.value,
                        cache=cli.path(_WIDTHS_CACHE.value))
  latency.check(probe)
  return probe


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not flags.FLAGS["verbosity"].present:
    # The per-run progress line is the output; the benchmark's log lines come with -v 0.
    logging.set_verbosity(logging.WARNING)
  # Imported here so that flag errors and --help do not pay for the imports.
  from graph_prune.bench import benchmark  # pylint: disable=g-import-not-at-top
  from graph_prune.data import preprocess  # pylint: disable=g-import-not-at-top
  from graph_prune.sweep import config  # pylint: disable=g-import-not-at-top
  from graph_prune.sweep import sweep  # pylint: disable=g-import-not-at-top
  out_dir = cli.path(_OUT_DIR.value)
  try:
    if _PLOTS_ONLY.value:
      for path in sweep.plots_only(out_dir):
        print(path)
      return 0
    if not flags.FLAGS["in"].value:
      raise errors.UsageError("--in is required (the model to sweep)")
    settings = config.Config(
        model=cli.path(flags.FLAGS["in"].value), out_dir=out_dir,
        ratios=config.parse_ratios(_RATIOS.value),
        criteria=config.parse_criteria(_CRITERIA.value),
        round_to=config.parse_round_to(_ROUND_TO.value),
        batch_sizes=benchmark.parse_batch_sizes(_BENCH.batch_sizes.value),
        device=_BENCH.device.value, xla=_BENCH.xla.value, timing=_BENCH.timing(),
        memory=_BENCH.memory.value, memory_runs=_MEMORY_RUNS.value,
        seed=_SEED.value, tolerance=_TOLERANCE.value, signature=_SIGNATURE.value,
        inputs=tuple(_INPUTS.value), outputs=tuple(_OUTPUTS.value), data=_data(),
        keep_models=_KEEP_MODELS.value, widths_cache=cli.path(_WIDTHS_CACHE.value),
        overwrite=_OVERWRITE.value, reconstruct=calibration_flags.reconstruct(_SEED.value),
        quantize=config.parse_quantize(calibration_flags.QUANTIZE.value.split(",")),
        quantize_calibration=calibration_flags.QUANTIZE_CALIBRATION.value,
        min_agreement=calibration_flags.MIN_AGREEMENT.value,
        allocations=config.parse_allocations(_ALLOCATIONS.value),
        target_speedups=config.parse_target_speedups(_TARGET_SPEEDUPS.value),
        latency=_latency_probe())
    steps = []
    data = settings.data
    prep = (preprocess.Preprocess(resize=data.resize, scale=data.scale, mean=data.mean,
                                  std=data.std) if data else preprocess.Preprocess())
    settings = dataclasses.replace(settings, calibration=calibration_flags.calibration(
        cli, lambda: prep, cli.path(_DATA_DIR.value)),
        taylor=calibration_flags.taylor(settings.criteria))
    recovery = recover_flags.options(cli, prep, cli.path(_DATA_DIR.value), _SEED.value)
    if recovery is not None:
      from graph_prune.sweep import recovery as recovery_lib  # pylint: disable=g-import-not-at-top
      steps.append(recovery_lib.RecoveryStep(recovery))
    summary = sweep.run(settings, steps, progress=_progress, notify=_say, runner=_RUNNER.value,
                        beam_options=tuple(_BEAM_OPTIONS.value))
  except errors.GraphPruneError as e:
    print(f"sweep: error: {e}", file=sys.stderr)
    return 2
  auto = summary.round_to_auto
  print(f"sweep: {summary.runs} runs ({summary.new} run now, {summary.skipped} from before"
        f"{', a torn last line dropped' if summary.torn_line_dropped else ''}), "
        f"{summary.failed} not ok, {summary.elapsed_s:.0f} s")
  if auto:
    print(f"round_to=auto: {auto['how']}")
  print(f"rows: {os.path.join(summary.out_dir, sweep.ROWS_CSV)}")
  for path in summary.plots:
    print(f"plot: {path}")
  return 0


if __name__ == "__main__":
  app.run(main)
