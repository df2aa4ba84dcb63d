"""What the command-line tools share: path resolution under `bazel run`, and the
benchmark's flags (//tools:bench and //tools:sweep time models the same way)."""

import os

from absl import flags

from graph_prune import errors


def path(p):
  """Paths are relative to where `bazel run` was called from."""
  if p is None or os.path.isabs(p):
    return p
  return os.path.join(os.environ.get("BUILD_WORKING_DIRECTORY", ""), p)


def data_path(spec):
  """A data spec: 'fashion-mnist:SPLIT' is a name, not a path; globs resolve like paths."""
  if spec is None:
    return None
  return spec if spec.startswith("fashion-mnist:") else path(spec)


class BenchFlags:
  """The benchmark flags, defined once per program that asks for them."""

  def __init__(self):
    self.batch_sizes = flags.DEFINE_list("batch_sizes", ["1"], "Batch sizes, e.g. 1,8,32.")
    self.device = flags.DEFINE_string("device", "auto",
                                      "auto (TPU, GPU, else CPU), cpu, gpu[:N], tpu[:N].")
    self.xla = flags.DEFINE_boolean("xla", True,
                                    "Compile TensorFlow models with XLA (jit_compile).")
    self.max_seconds = flags.DEFINE_float(
        "max_seconds", 10.0, "Benchmark: time budget of the timed loop per model and batch size.")
    self.target_rse = flags.DEFINE_float(
        "target_rse", 0.01, "Benchmark: stop once every median has this relative standard error.")
    self.warmup = flags.DEFINE_integer("warmup", 2,
                                       "Benchmark: untimed calls per model and batch size.")
    self.min_runs = flags.DEFINE_integer("min_runs", 5,
                                         "Benchmark: timed calls per model that always run.")
    self.memory = flags.DEFINE_boolean("memory", True,
                                       "Measure peak memory (a child process each).")

  def timing(self):
    """timing.Settings from the flags; bad values are a UsageError."""
    from graph_prune.bench import timing  # pylint: disable=g-import-not-at-top
    try:
      return timing.Settings(warmup=self.warmup.value, min_runs=self.min_runs.value,
                             max_seconds=self.max_seconds.value,
                             target_rse=self.target_rse.value)
    except ValueError as e:
      raise errors.UsageError(f"{e} (--warmup, --min_runs, --max_seconds, --target_rse)"
                              ) from None
