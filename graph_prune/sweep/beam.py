"""The sweep's runs on Apache Beam: each run is one element; the runs are pruned,
verified, evaluated and recovered in parallel on the pipeline's workers, then
benchmarked one at a time, and each row is appended to rows.jsonl by the pipeline
as its benchmark ends.

Why the benchmark stage is serial: a latency measured while other runs prune,
train or evaluate on the same machine measures the contention, not the model.
So all runs first go through the parallel stage; a GroupByKey on one key is the
barrier after it, and one worker then benchmarks the runs in plan order with
nothing else of the sweep running. (On a cluster the benchmarks then run on one
worker, whose device is the row's `device_name`.)

The rest of the sweep stays where it was (sweep.py, in the calling process):
the definition check, the original's figures, the resume rule (runs with a row
are not planned again; the last line torn by a kill is dropped), the CSV, the
plots and TensorBoard, rewritten from rows.jsonl after the pipeline. rows.jsonl
lives on a file system every worker writes to (local for the DirectRunner; a
shared mount on a cluster); a row is one write of one line with O_APPEND, so
rows from two writers never interleave.
"""

from __future__ import annotations

import contextlib
import io
from typing import Any, Callable, Sequence

from graph_prune import errors
from graph_prune.sweep import rows as rows_lib

RUNNERS = ("DirectRunner", "FlinkRunner", "SparkRunner", "DataflowRunner", "PrismRunner",
           "PortableRunner")
PACKAGE = "apache-beam==2.77.0"


def check(runner: str, options: Sequence[str]) -> Any:
  """Beam's PipelineOptions for the runner and the pass-through options; UsageError
  for an unknown runner, a missing package or options Beam rejects."""
  if runner not in RUNNERS:
    raise errors.UsageError(f"unknown --runner '{runner}'; choose local or one of "
                            f"{', '.join(RUNNERS)}")
  try:
    from apache_beam.options import pipeline_options  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise errors.UsageError(f"--runner={runner} needs Apache Beam: pip install {PACKAGE}"
                            ) from None
  bad = [o for o in options if not o.startswith("--")]
  if bad:
    raise errors.UsageError(f"--beam_options: '{bad[0]}' is not a Beam pipeline option "
                            "(--name=value)")
  said = io.StringIO()
  try:
    # argparse prints its usage on a bad value: kept for the one-line message.
    with contextlib.redirect_stderr(said):
      opts = pipeline_options.PipelineOptions([f"--runner={runner}", *options])
      unknown = opts.get_all_options(retain_unknown_options=True, drop_default=True)
      opts.get_all_options()   # parses, and exits on values of the wrong type
  except (SystemExit, ValueError, TypeError) as e:
    why = [l.split("error: ", 1)[1] for l in said.getvalue().splitlines() if "error: " in l]
    raise errors.UsageError(f"Beam rejects --beam_options {','.join(options)}: "
                            f"{why[0] if why else e}") from None
  known = set(pipeline_options.PipelineOptions([]).get_all_options())
  extra = sorted(k for k in unknown if k not in known)
  if extra:
    raise errors.UsageError(f"--beam_options: Beam knows no option '--{extra[0]}'")
  return opts


class _BenchAndWrite:
  """The serial stage: `finish(prepared)` (sweep.finish_run: the benchmark and the
  row) for each run in plan order, each row appended to rows.jsonl as it is done."""

  def __init__(self, finish: Callable, order: dict[str, int], jsonl: str):
    self._finish, self._order, self._jsonl = finish, order, jsonl

  def __call__(self, keyed):
    _, prepared = keyed
    for run in sorted(prepared, key=lambda r: self._order[r.spec.key]):
      row = self._finish(run)
      rows_lib.append(self._jsonl, row)
      yield row


def run(prepare: Callable, finish: Callable, specs: Sequence[Any], opts, jsonl: str) -> None:
  """Runs `specs` on the pipeline described by `opts` (from check)."""
  import apache_beam as beam  # pylint: disable=g-import-not-at-top
  order = {s.key: i for i, s in enumerate(specs)}
  try:
    with beam.Pipeline(options=opts) as p:
      _ = (p | "runs" >> beam.Create(list(specs), reshuffle=True)
           | "prune, verify, evaluate" >> beam.Map(prepare)
           | "one key" >> beam.Map(lambda run: (0, run))
           | "barrier" >> beam.GroupByKey()
           | "benchmark one at a time" >> beam.FlatMap(_BenchAndWrite(finish, order, jsonl)))
  except errors.GraphPruneError:
    raise
  except Exception as e:  # pylint: disable=broad-except  (runners raise their own types)
    raise errors.RunError(f"the Beam pipeline failed ({errors.first_line(e)}); the rows "
                          "written so far are kept: run again to resume") from None
