"""The sweep's rows: their columns, the append-only JSONL file and its CSV copy.

One row per run (ratio x criterion x round_to), flat, JSON-ready. Every row has
every column of its sweep (null where a figure does not apply: a failed run, no
--data). Columns, in order:

  key              "r<ratio>_<criterion>_rt<round_to>", e.g. r0.5_l1_rtauto ("s<target
                   speedup>" instead of "r<ratio>" for a budget; "_a<allocation>"
                   after it when not uniform; "_q<scheme>" when quantized)
  model            name of the input model (file or SavedModel directory stem)
  ratio            requested fraction of channels removed per group (for a budget:
                   the chosen plan's fraction of all channels)
  criterion        l1, l2, bn_scale, fpgm or random
  round_to         requested multiple: an integer, or "auto"
  round_to_used    the multiple pruned with ("auto" resolved once per sweep)
  status           ok, verify_failed (the oracle rejected the pruned model),
                   prune_failed, bench_failed, eval_failed, <step>_failed, or
                   error (an unexpected exception; its traceback is logged)
  error            one line saying why, for a status other than ok
  params_orig, params_pruned, params_reduction    parameters; reduction is
                   orig / pruned (a factor: 2.0 is half the parameters)
  flops_orig, flops_pruned, flops_reduction        FLOPs, likewise
  const_bytes_orig, const_bytes_pruned             bytes of the constants
  groups_pruned, groups_total                      channel groups
  verify_max_abs_diff, verify_max_rel_diff   the oracle's largest difference
                   between the pruned model and the masked original
  output_change_max_rel   how far pruning moved the outputs against the
                   unpruned model (relative; not an error, the pruning's effect)
  prune_s          seconds of pipeline.prune: load, plan, rewrite, verify, write
  device, device_name, xla, runtime    where and how the models ran
                   (runtime: tensorflow-xla, tensorflow or onnxruntime)
  b<B>_latency_orig_median_ms, b<B>_latency_orig_p90_ms,
  b<B>_latency_pruned_median_ms, b<B>_latency_pruned_p90_ms
                   per batch size B: latency of each model, run in alternation
                   with the other (A B A B ...) in the same process
  b<B>_speedup_median, b<B>_speedup_p10, b<B>_speedup_p90, b<B>_speedup_pairs
                   original time / pruned time per A-B pair, summarised
  b<B>_efficiency  b<B>_speedup_median / flops_reduction (1.0: the speedup the
                   FLOPs promise)
  b<B>_converged   whether the medians reached the target relative error
  b<B>_peak_orig_bytes, b<B>_peak_pruned_bytes, b<B>_peak_method
                   peak memory of a fresh process running each model (device
                   memory on GPU/TPU, RSS above the post-import baseline on CPU;
                   see graph_prune/bench/memory.py); the original's is measured
                   once per sweep
  bench_s          seconds of benchmarking (timing and memory)
  with --data:
  top1_orig, top5_orig   accuracy of the original (evaluated once per sweep)
  top1, top5       accuracy of the pruned model
  top1_drop        top1_orig - top1
  agreement_top1   fraction of samples where pruned and original predict the
                   same class
  mean_kl          mean KL(softmax(original) || softmax(pruned)), nats
  eval_samples, eval_s
  with --reconstruct:
  reconstruct_method, reconstruct_layers (layers re-fitted), reconstruct_s,
  holdout_agreement_sliced, holdout_agreement_reconstructed,
  holdout_rel_error_sliced, holdout_rel_error_reconstructed
                   top-1 agreement and relative error against the original on
                   the calibration samples kept out of the fit, before and after
  with --quantize (one run per scheme; "none" runs are not quantized):
  quantize         the scheme; quantize_bytes_float, quantize_bytes (the model
                   before and after), quantize_agreement, quantize_rel_error
                   (against the float pruned model on the held-out calibration
                   samples), quantize_s; a run below --min_agreement has status
                   quantize_failed
  then:
  <columns of extra steps>   (see sweep.Step); the recovery step
                   (graph_prune/sweep/recovery.py) adds recover_method,
                   recover_train_steps, top1_recovered, top5_recovered,
                   top1_recovered_drop (top1_orig - top1_recovered),
                   agreement_recovered, holdout_agreement_before/after (on the
                   samples kept out of recovery), recover_s
  allocation, target_speedup, budget_speedup, budget_predicted_speedup
                   (sweeps with --allocations or --target_speedups) how kept counts
                   were chosen, the budget, the speedup the command measured for its
                   plan (at the first batch size) and, for latency allocation, the
                   speedup its latency model predicted
  elapsed_s        seconds of the whole run
  finished_at      UTC time the row was written, ISO 8601

Durability: a row is one line appended with a single write, flushed and
fsync'ed; a line torn by a kill is the last one, has no newline (or is not
JSON) and is dropped when the file is read back. The CSV is rewritten from the
rows after each one, atomically.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from typing import Any, Iterable, Optional, Sequence

from graph_prune import errors
from graph_prune import files

STATUS_OK = "ok"

BASE_COLUMNS = (
    "key", "model", "ratio", "criterion", "round_to", "round_to_used", "status", "error",
    "params_orig", "params_pruned", "params_reduction",
    "flops_orig", "flops_pruned", "flops_reduction",
    "const_bytes_orig", "const_bytes_pruned", "groups_pruned", "groups_total",
    "verify_max_abs_diff", "verify_max_rel_diff", "output_change_max_rel", "prune_s",
    "device", "device_name", "xla", "runtime",
)
BATCH_COLUMNS = (
    "latency_orig_median_ms", "latency_orig_p90_ms",
    "latency_pruned_median_ms", "latency_pruned_p90_ms",
    "speedup_median", "speedup_p10", "speedup_p90", "speedup_pairs", "efficiency",
    "converged", "peak_orig_bytes", "peak_pruned_bytes", "peak_method",
)
ACCURACY_COLUMNS = ("top1_orig", "top5_orig", "top1", "top5", "top1_drop", "agreement_top1",
                    "mean_kl", "eval_samples", "eval_s")
RECONSTRUCT_COLUMNS = ("reconstruct_method", "reconstruct_layers", "reconstruct_s",
                       "holdout_agreement_sliced", "holdout_agreement_reconstructed",
                       "holdout_rel_error_sliced", "holdout_rel_error_reconstructed")
QUANTIZE_COLUMNS = ("quantize", "quantize_bytes_float", "quantize_bytes", "quantize_agreement",
                    "quantize_rel_error", "quantize_s")
BUDGET_COLUMNS = ("allocation", "target_speedup", "budget_speedup", "budget_predicted_speedup")
TAIL_COLUMNS = ("elapsed_s", "finished_at")


def batch_column(batch: int, name: str) -> str:
  return f"b{batch}_{name}"


def columns(batch_sizes: Sequence[int], accuracy: bool,
            extra: Sequence[str] = (), reconstruct: bool = False,
            quantize: bool = False, budget: bool = False) -> tuple[str, ...]:
  """Every column of a sweep, in order."""
  out = list(BASE_COLUMNS)
  if budget:
    out += BUDGET_COLUMNS
  if reconstruct:
    out += RECONSTRUCT_COLUMNS
  if quantize:
    out += QUANTIZE_COLUMNS
  for b in batch_sizes:
    out += [batch_column(b, c) for c in BATCH_COLUMNS]
  out.append("bench_s")
  if accuracy:
    out += ACCURACY_COLUMNS
  out += [c for c in extra if c not in out]
  out += TAIL_COLUMNS
  return tuple(out)


def clean(value: Any) -> Any:
  """JSON has no NaN or infinity: such figures become null."""
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def encode(row: dict[str, Any]) -> bytes:
  """One row as one JSONL line (keys in column order, ending in a newline)."""
  return (json.dumps({k: clean(v) for k, v in row.items()}, allow_nan=False) + "\n").encode()


def read(path: str) -> tuple[list[dict[str, Any]], int, bool]:
  """The rows of a JSONL file, the byte length of its complete lines, and whether
  a torn tail (bytes after the last newline: a write cut short by a kill) was
  found; the tail is not in the rows. A complete line that is not a row is not a
  kill's doing: InputError, and so are two rows with one key."""
  if not os.path.exists(path):
    return [], 0, False
  with open(path, "rb") as f:
    data = f.read()
  *complete, tail = data.split(b"\n")
  rows = []
  for i, line in enumerate(complete):
    try:
      row = json.loads(line)
      if not isinstance(row, dict) or "key" not in row:
        raise ValueError("not a row")
    except ValueError:
      raise errors.InputError(f"'{path}' line {i + 1} is not a JSON row (a kill tears only "
                              "the last line); repair the file, or pass --overwrite to start "
                              "the sweep over") from None
    rows.append(row)
  keys = [r["key"] for r in rows]
  dupes = sorted({k for k in keys if keys.count(k) > 1})
  if dupes:
    raise errors.InputError(f"'{path}' has more than one row for {', '.join(dupes[:3])}; "
                            "repair the file, or pass --overwrite to start the sweep over")
  return rows, len(data) - len(tail), bool(tail)


def truncate(path: str, length: int) -> None:
  """Drops a torn tail so that the next append starts a fresh line."""
  with open(path, "r+b") as f:
    f.truncate(length)
    f.flush()
    os.fsync(f.fileno())


def append(path: str, row: dict[str, Any]) -> None:
  """Appends one row durably: one write of the whole line, flush, fsync."""
  line = encode(row)
  new = not os.path.exists(path)
  fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
  try:
    written = os.write(fd, line)
    while written < len(line):  # a short write (rare): finish the line
      written += os.write(fd, line[written:])
    os.fsync(fd)
  finally:
    os.close(fd)
  if new:
    files.sync_dir(os.path.dirname(os.path.abspath(path)))


def _csv_value(value: Any) -> Any:
  if value is None:
    return ""
  if isinstance(value, bool):
    return "true" if value else "false"
  return value


def to_csv(rows: Iterable[dict[str, Any]], cols: Optional[Sequence[str]] = None) -> bytes:
  """The rows as CSV: the given columns, then any other keys in order of appearance."""
  rows = list(rows)
  names = list(cols or ())
  for r in rows:
    names += [k for k in r if k not in names]
  out = io.StringIO()
  writer = csv.writer(out, lineterminator="\n")
  writer.writerow(names)
  for r in rows:
    writer.writerow([_csv_value(clean(r.get(c))) for c in names])
  return out.getvalue().encode()


def write_csv(path: str, rows: Iterable[dict[str, Any]],
              cols: Optional[Sequence[str]] = None) -> None:
  files.write_atomic(path, to_csv(rows, cols))
