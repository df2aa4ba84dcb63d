"""A sweep: every ratio x criterion x round_to of one model pruned, verified,
benchmarked against the original and, with data, evaluated; one row per run.

  summary = sweep.run(config.Config(model="model.pb", out_dir="out", ratios=(0.25, 0.5),
                                   criteria=("l1", "fpgm"), round_to=(1, "auto")))

Files in out_dir:
  sweep.json          the defining settings (`definition`), the multiple that
                      round_to "auto" resolved to, and the original's figures
                      measured once (peak memory per batch size, accuracy)
  rows.jsonl          one row per finished run (columns: graph_prune/sweep/rows.py)
  rows.csv            the same rows as CSV, rewritten atomically after each row
  models/<key>.<ext>  the pruned models (.pb, .pbtxt, .onnx, or a .savedmodel
                      directory), written atomically by the pipeline; removed after
                      their run with keep_models=False
  plots/*.png         graph_prune/sweep/plots.py, written at the end
  tensorboard/        the rows as TensorBoard HParams (graph_prune/sweep/
                      tensorboard.py), rewritten at the end

Each run: pipeline.prune with the same options as //tools:prune; the bench's A/B
timing of pruned against original (benchmark.run, memory in fresh child
processes, the original's once per sweep); evaluate with the original as the
reference; then the extra steps (`Step`, e.g. recovery). A run that fails in a
known way (the oracle rejects the pruned model, nothing to prune, ...) is a row
with its status; an unexpected exception in a run is a row with status "error"
and its traceback in the log; an OSError (disk full, ...) stops the sweep.

Resume: run the same sweep again. Runs with a row in rows.jsonl are skipped; a
last line torn by a kill is dropped (that run runs again), so no row is lost or
duplicated. A sweep with other defining settings (model file and its content,
ratios, criteria, round_to, batch sizes, device, xla, memory, seed, tolerance,
model tensors, data and its preprocessing, step names) is refused unless
`overwrite`, which deletes the sweep's own files first. Timing budget,
keep_models and the widths cache are not defining: a resume may change them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import functools
import glob
import json
import os
import shutil
import time
from typing import Any, Callable, Mapping, Optional, Protocol, Sequence

from absl import logging

from graph_prune import errors
from graph_prune import files
from graph_prune import pipeline
from graph_prune.bench import benchmark
from graph_prune.bench import memory
from graph_prune.bench import timing
from graph_prune.bench import widths
from graph_prune.quantize import options as quantize_options
from graph_prune.sweep import beam as beam_lib
from graph_prune.sweep import config as config_lib
from graph_prune.sweep import plots
from graph_prune.sweep import rows as rows_lib
from graph_prune.sweep import tensorboard

SCHEMA = "graph_prune.sweep/1"
SWEEP_JSON, ROWS_JSONL, ROWS_CSV, PLOTS_DIR, TENSORBOARD_DIR, LOCK = (
    "sweep.json", "rows.jsonl", "rows.csv", "plots", "tensorboard", ".sweep.lock")


@dataclasses.dataclass(frozen=True)
class RunContext:
  """What an extra step sees of one run: its spec, the models, the row so far."""
  config: config_lib.Config
  run: config_lib.RunSpec
  original: str
  pruned: str                # exists while the steps run
  row: Mapping[str, Any]
  baseline: Mapping[str, Any]


class Step(Protocol):
  """An extra per-run step after benchmarking and evaluation, e.g. recovery
  (fine-tuning) and the accuracy after it. It returns its columns' values
  (keys from `columns`); a GraphPruneError makes the row's status
  '<name>_failed'. Its name is part of the sweep's definition."""
  name: str
  columns: tuple[str, ...]

  def __call__(self, ctx: RunContext) -> Mapping[str, Any]:
    ...


@dataclasses.dataclass(frozen=True)
class Summary:
  out_dir: str
  runs: int                  # in the sweep
  skipped: int               # found in rows.jsonl
  new: int                   # run now
  failed: int                # rows (old and new) with a status other than ok
  torn_line_dropped: bool
  round_to_auto: Optional[dict[str, Any]]
  plots: tuple[str, ...]
  elapsed_s: float


Progress = Callable[[int, int, dict[str, Any], float], None]
Notify = Callable[[str], None]



def _read_json(path: str) -> dict[str, Any]:
  try:
    with open(path, encoding="utf-8") as f:
      doc = json.load(f)
  except (OSError, ValueError) as e:
    raise errors.InputError(f"cannot read '{path}' ({e}); pass --overwrite to start the sweep "
                            "over") from None
  if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
    raise errors.InputError(f"'{path}' is not a {SCHEMA} file; pass --overwrite to start the "
                            "sweep over, or choose another --out_dir")
  return doc


def _mismatch(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
  diffs = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
  shown = []
  for k in diffs[:2]:
    a, b = json.dumps(old.get(k)), json.dumps(new.get(k))
    if len(a) + len(b) > 160:
      a, b = a[:77] + "...", b[:77] + "..."
    shown.append(f"{k}: {a} there, {b} now")
  more = f" (+{len(diffs) - 2} more)" if len(diffs) > 2 else ""
  return "; ".join(shown) + more


def _clear(out_dir: str) -> None:
  """--overwrite: removes the sweep's own files, nothing else in out_dir."""
  for name in (SWEEP_JSON, ROWS_JSONL, ROWS_CSV):
    path = os.path.join(out_dir, name)
    if os.path.exists(path):
      os.remove(path)
  for name in (config_lib.MODELS_DIR, PLOTS_DIR, TENSORBOARD_DIR):
    shutil.rmtree(os.path.join(out_dir, name), ignore_errors=True)


@contextlib.contextmanager
def _locked(out_dir: str):
  """One sweep at a time in a directory (two would run the same runs twice). The
  kernel drops the lock when its process dies, so a killed sweep leaves none."""
  fd = os.open(os.path.join(out_dir, LOCK), os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      raise errors.UsageError(f"another sweep is running in --out_dir '{out_dir}'; wait for it "
                              "or choose another --out_dir") from None
    # Temporary files of atomic writes cut short by a kill.
    for tmp in (glob.glob(os.path.join(out_dir, ".gp_tmp_*"))
                + glob.glob(os.path.join(out_dir, config_lib.MODELS_DIR, ".gp_tmp_*"))):
      _remove(tmp)
    yield
  finally:
    os.close(fd)


def _existing(config: config_lib.Config, wanted: dict[str, Any]) -> Optional[dict[str, Any]]:
  """The sweep.json of a sweep to resume, None for a fresh one; refuses another sweep."""
  out = config.out_dir
  sweep_json, rows_jsonl = os.path.join(out, SWEEP_JSON), os.path.join(out, ROWS_JSONL)
  if config.overwrite:
    _clear(out)
    return None
  if not os.path.exists(sweep_json):
    if os.path.exists(rows_jsonl):
      raise errors.UsageError(f"--out_dir '{out}' has {ROWS_JSONL} but no {SWEEP_JSON}; pass "
                              "--overwrite to start over, or choose another --out_dir")
    return None
  doc = _read_json(sweep_json)
  if doc.get("definition") != wanted:
    raise errors.UsageError(
        f"--out_dir '{out}' holds another sweep ({_mismatch(doc.get('definition') or {}, wanted)}"
        "); resume it with its flags, choose another --out_dir, or pass --overwrite")
  return doc


# --- measuring -------------------------------------------------------------------


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()


def _one_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return (text[0] if text else type(e).__name__)[:500]


def _bench_options(config: config_lib.Config, model: str, baseline: Optional[str], **kw):
  return benchmark.Options(
      model=model, baseline=baseline, batch_sizes=tuple(config.batch_sizes),
      device=config.device, xla=config.xla, seed=config.seed, signature=config.signature,
      inputs=tuple(config.inputs), outputs=tuple(config.outputs), **kw)


def _eval_options(config: config_lib.Config, reference: Optional[str]):
  from graph_prune.data import preprocess  # pylint: disable=g-import-not-at-top
  from graph_prune.evaluate import evaluate  # pylint: disable=g-import-not-at-top
  d = config.data
  return evaluate.Options(
      reference=_model_spec(config, reference) if reference else None,
      data_format=d.data_format, data_dir=d.data_dir, split=d.split,
      preprocess=preprocess.Preprocess(resize=d.resize, scale=d.scale, mean=d.mean, std=d.std),
      batch_size=d.batch_size, max_samples=d.max_samples)


def _model_spec(config: config_lib.Config, path: str):
  from graph_prune.evaluate import evaluate  # pylint: disable=g-import-not-at-top
  return evaluate.ModelSpec(
      path, signature=config.signature,
      input=config.inputs[0] if len(config.inputs) == 1 else None,
      output=config.outputs[0] if len(config.outputs) == 1 else None)


def evaluate_model(config: config_lib.Config, path: str, reference: Optional[str]
                   ) -> dict[str, Any]:
  """The evaluate report of the model at `path` on the sweep's data."""
  from graph_prune.evaluate import evaluate  # pylint: disable=g-import-not-at-top
  return evaluate.evaluate(_model_spec(config, path), config.data.spec,
                           _eval_options(config, reference))


def measure_original(config: config_lib.Config, notify: Notify = logging.info) -> dict[str, Any]:
  """What is measured of the original once per sweep: that it loads and has
  something to prune, its device, its peak memory per batch size, its accuracy.
  Bad input (a file that is not a model, a fixed batch size, bad data) fails here,
  before any run."""
  prepared = pipeline.prepare(config.model, pipeline.Options(
      signature=config.signature, inputs=tuple(config.inputs), outputs=tuple(config.outputs)))
  if not any(g.prunable for g in prepared.analysis.groups):
    raise errors.NothingToPruneError(f"--in '{config.model}': nothing prunable, every channel "
                                     "group is left whole (see //tools:prune's report)")
  del prepared
  notify("sweep: measuring the original (device" + (", peak memory" if config.memory else "")
         + ")")
  doc = benchmark.run(_bench_options(
      config, config.model, None, memory=config.memory, memory_runs=config.memory_runs,
      timing=timing.Settings(warmup=0, min_runs=1, max_runs=1)))
  m = doc["models"]["candidate"]
  out = {"device": doc["device"], "device_name": doc["device_name"], "runtime": m["runtime"],
         "const_bytes_on_disk": m["const_bytes"],
         "peak": {b: {"bytes": e["peak_bytes"], "method": e["peak_method"]}
                  for b, e in m["batches"].items()},
         "accuracy": None}
  if config.data:
    notify(f"sweep: evaluating the original on {config.data.spec}")
    e = evaluate_model(config, config.model, None)
    out["accuracy"] = {"top1": e["top1"], "top5": e["top5"], "samples": e["samples"]}
  return out


def resolve_auto(config: config_lib.Config, device_label: str) -> dict[str, Any]:
  """round_to "auto" on the sweep's device, as //tools:prune resolves it."""
  multiple, how = widths.resolve_round_to("auto", device_label, config.widths_cache,
                                          xla=config.xla)
  return {"multiple": multiple, "how": how}


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
  return a / b if a is not None and b else None


class _Failed(Exception):
  """Ends a run with a status (internal)."""

  def __init__(self, status: str, error: BaseException):
    super().__init__(status)
    self.status, self.error = status, error


def _prune(config: config_lib.Config, spec: config_lib.RunSpec, used: int, how: str, path: str,
           row: dict) -> None:
  options = pipeline.Options(
      ratio=spec.ratio, criterion=spec.criterion, round_to=used, round_to_how=how,
      allocation=spec.allocation, target_speedup=spec.target_speedup,
      latency=config.latency if spec.target_speedup is not None else None,
      seed=config.seed, verify=True, tolerance=config.tolerance, signature=config.signature,
      inputs=tuple(config.inputs), outputs=tuple(config.outputs), overwrite=True,
      reconstruct=config.reconstruct, calibration=config.calibration, taylor=config.taylor,
      quantize=(quantize_options.Options(spec.quantize, config.quantize_calibration,
                                         min_agreement=config.min_agreement)
                if spec.quantize != "none" else None))
  t0 = time.perf_counter()
  try:
    report = pipeline.prune(config.model, path, options)
  except errors.VerificationError as e:
    raise _Failed("verify_failed", e) from None
  except errors.QuantizationError as e:
    raise _Failed("quantize_failed", e) from None
  except errors.GraphPruneError as e:
    raise _Failed("prune_failed", e) from None
  row["prune_s"] = time.perf_counter() - t0
  v = report["verify"] or {}
  row.update(
      params_orig=report["params_before"], params_pruned=report["params_after"],
      params_reduction=_ratio(report["params_before"], report["params_after"]),
      flops_orig=report["flops_before"], flops_pruned=report["flops_after"],
      flops_reduction=_ratio(report["flops_before"], report["flops_after"]),
      const_bytes_orig=report["const_bytes_before"],
      const_bytes_pruned=report["const_bytes_after"],
      groups_pruned=report["groups_pruned"], groups_total=report["groups_total"],
      verify_max_abs_diff=v.get("max_abs_diff"), verify_max_rel_diff=v.get("max_rel_diff"),
      output_change_max_rel=v.get("effect_max_rel"), round_to_used=report["round_to"])
  if spec.target_speedup is not None:
    b = report.get("budget") or {}
    row.update(ratio=report["ratio"], budget_speedup=b.get("measured_speedup"),
               budget_predicted_speedup=b.get("predicted_speedup"))
  q = report.get("quantization")
  if q:
    row.update(quantize_bytes_float=q["model_bytes_before"], quantize_bytes=q["model_bytes_after"],
               quantize_agreement=q["holdout"]["agreement"],
               quantize_rel_error=q["holdout"]["rel_error"], quantize_s=q["quantize_s"])
  r = report.get("reconstruction")
  if r:
    row.update(reconstruct_method=r["method"], reconstruct_layers=r["layers_refitted"],
               reconstruct_s=r["seconds"],
               holdout_agreement_sliced=r["holdout_before"]["agreement"],
               holdout_agreement_reconstructed=r["holdout_after"]["agreement"],
               holdout_rel_error_sliced=r["holdout_before"]["rel_error"],
               holdout_rel_error_reconstructed=r["holdout_after"]["rel_error"])


def _bench(config: config_lib.Config, path: str, baseline: Mapping[str, Any], row: dict) -> None:
  t0 = time.perf_counter()
  try:
    doc = benchmark.run(_bench_options(config, path, config.model, memory=False,
                                       timing=config.timing))
  except errors.GraphPruneError as e:
    raise _Failed("bench_failed", e) from None
  col = rows_lib.batch_column
  models = doc["models"]
  row.update(device=doc["device"], device_name=doc["device_name"], xla=doc["xla"],
             runtime=models["candidate"]["runtime"])
  for b in config.batch_sizes:
    orig, pruned = models["baseline"]["batches"][str(b)], models["candidate"]["batches"][str(b)]
    pair = doc["pairs"][str(b)]
    s = pair["speedup"]
    row.update({
        col(b, "latency_orig_median_ms"): orig["latency_ms"]["median"],
        col(b, "latency_orig_p90_ms"): orig["latency_ms"]["p90"],
        col(b, "latency_pruned_median_ms"): pruned["latency_ms"]["median"],
        col(b, "latency_pruned_p90_ms"): pruned["latency_ms"]["p90"],
        col(b, "speedup_median"): s["median"], col(b, "speedup_p10"): s["p10"],
        col(b, "speedup_p90"): s["p90"], col(b, "speedup_pairs"): s["n"],
        col(b, "efficiency"): _ratio(s["median"], row["flops_reduction"]),
        col(b, "converged"): pair["converged"],
    })
    peak = baseline["peak"].get(str(b)) or {}
    row[col(b, "peak_orig_bytes")] = peak.get("bytes")
    if config.memory:
      p = memory.measure(memory.Request(
          path, doc["device"], b, config.xla, config.memory_runs, config.seed,
          config.signature, tuple(config.inputs), tuple(config.outputs)))
      row[col(b, "peak_pruned_bytes")], row[col(b, "peak_method")] = p.peak_bytes, p.method
    else:
      row[col(b, "peak_method")] = "not measured"
  row["bench_s"] = time.perf_counter() - t0


def _accuracy(config: config_lib.Config, path: str, baseline: Mapping[str, Any], row: dict) -> None:
  t0 = time.perf_counter()
  try:
    e = evaluate_model(config, path, config.model)
  except errors.GraphPruneError as err:
    raise _Failed("eval_failed", err) from None
  orig = baseline["accuracy"]
  row.update(top1_orig=orig["top1"], top5_orig=orig["top5"], top1=e["top1"], top5=e["top5"],
             top1_drop=orig["top1"] - e["top1"], agreement_top1=e["agreement"]["top1"],
             mean_kl=e["agreement"]["mean_kl"], eval_samples=e["samples"],
             eval_s=time.perf_counter() - t0)


def _remove(path: str) -> None:
  if os.path.isdir(path):
    shutil.rmtree(path)
  elif os.path.exists(path):
    os.remove(path)


@dataclasses.dataclass
class PreparedRun:
  """A run after its parallel part (pruned, verified, evaluated, extra steps), before
  its benchmark: what the serial part needs (Beam carries it between workers)."""
  spec: config_lib.RunSpec
  row: dict[str, Any]
  path: str
  seconds: float
  failed: bool


def prepare_run(config: config_lib.Config, spec: config_lib.RunSpec, state: Mapping[str, Any],
                cols: Sequence[str], steps: Sequence[Step] = ()) -> PreparedRun:
  """Prunes, evaluates and runs the extra steps of one run; a failure is recorded
  in the row (never raised, except OSError)."""
  t0 = time.perf_counter()
  auto = state.get("round_to_auto") or {}
  used = auto["multiple"] if spec.round_to == config_lib.AUTO else spec.round_to
  baseline = state["baseline"]
  row = dict.fromkeys(cols)
  row.update(key=spec.key, model=config_lib.model_name(config.model), ratio=spec.ratio,
             criterion=spec.criterion, round_to=spec.round_to, round_to_used=used,
             **({"quantize": spec.quantize} if config.quantize != ("none",) else {}),
             **({"allocation": spec.allocation, "target_speedup": spec.target_speedup}
                if config.budgeted else {}),
             device=baseline["device"], device_name=baseline["device_name"], xla=config.xla,
             runtime=baseline["runtime"])
  path = config_lib.model_path(config, spec.key)
  _remove(path)  # left by a killed run
  failed = True
  try:
    how = auto.get("how", "") if spec.round_to == config_lib.AUTO else ""
    _prune(config, spec, used, how, path, row)
    if config.data:
      _accuracy(config, path, baseline, row)
    for step in steps:
      ctx = RunContext(config, spec, config.model, path, dict(row), baseline)
      try:
        values = dict(step(ctx))
      except errors.GraphPruneError as e:
        raise _Failed(f"{step.name}_failed", e) from None
      unknown = sorted(set(values) - set(step.columns))
      if unknown:
        raise ValueError(f"step {step.name} returned undeclared columns {unknown}")
      row.update(values)
    failed = False
  except _Failed as f:
    row.update(status=f.status, error=_one_line(f.error))
  except (OSError, MemoryError):
    raise
  except Exception as e:  # pylint: disable=broad-except
    # One broken run (an XLA compile error, a runtime fault) must not end a long sweep.
    logging.exception("sweep: run %s failed unexpectedly", spec.key)
    row.update(status="error", error=f"{type(e).__name__}: {_one_line(e)}")
  return PreparedRun(spec, row, path, time.perf_counter() - t0, failed)


def finish_run(config: config_lib.Config, state: Mapping[str, Any],
               run: PreparedRun) -> dict[str, Any]:
  """Benchmarks a prepared run (unless it failed) and completes its row."""
  t0 = time.perf_counter()
  row = dict(run.row)
  try:
    if not run.failed:
      _bench(config, run.path, state["baseline"], row)
      row["status"] = rows_lib.STATUS_OK
  except _Failed as f:
    row.update(status=f.status, error=_one_line(f.error))
  except (OSError, MemoryError):
    raise
  except Exception as e:  # pylint: disable=broad-except
    logging.exception("sweep: run %s failed unexpectedly", run.spec.key)
    row.update(status="error", error=f"{type(e).__name__}: {_one_line(e)}")
  finally:
    if not config.keep_models:
      _remove(run.path)
  row.update(elapsed_s=run.seconds + time.perf_counter() - t0, finished_at=_now())
  return row


def run_one(config: config_lib.Config, spec: config_lib.RunSpec, state: Mapping[str, Any],
            cols: Sequence[str], steps: Sequence[Step] = ()) -> dict[str, Any]:
  """One run's row: prune, evaluate, extra steps, then benchmark (never raises for
  a failure of the run itself, except OSError)."""
  return finish_run(config, state, prepare_run(config, spec, state, cols, steps))


def progress_line(i: int, n: int, row: Mapping[str, Any], total_s: float) -> str:
  """'sweep: [3/90] r0.3_l1_rt1: ok, FLOPs 1.9x, speedup b1 1.52x b32 1.87x, top-1 0.9012,
  12.1 s (total 40 s)'."""
  parts = [f"sweep: [{i}/{n}] {row['key']}: {row['status']}"]
  if row.get("status") != rows_lib.STATUS_OK and row.get("error"):
    parts[0] += f" ({row['error'][:120]})"
  if row.get("flops_reduction"):
    parts.append(f"FLOPs {row['flops_reduction']:.2f}x")
  speed = [f"b{k[1:].split('_')[0]} {v:.2f}x" for k, v in row.items()
           if k.endswith("_speedup_median") and v is not None]
  if speed:
    parts.append("speedup " + " ".join(speed))
  if row.get("top1") is not None:
    parts.append(f"top-1 {row['top1']:.4f}")
  if row.get("top1_recovered") is not None:
    parts.append(f"after recovery {row['top1_recovered']:.4f}")
  parts.append(f"{row['elapsed_s']:.1f} s (total {total_s:.0f} s)")
  return ", ".join(parts)


def _log_progress(i: int, n: int, row: dict[str, Any], total_s: float) -> None:
  logging.info("%s", progress_line(i, n, row, total_s))


def run(config: config_lib.Config, steps: Sequence[Step] = (), progress: Optional[Progress] = None,
        notify: Optional[Notify] = None, runner: str = "local",
        beam_options: Sequence[str] = ()) -> Summary:
  """Runs (or resumes) the sweep; returns its summary. `progress` gets each new row,
  `notify` the sweep's other messages (both default to the log). `runner`: "local"
  (one run after the other in this process) or a Beam runner (sweep/beam.py) with
  its pipeline options. Raises a GraphPruneError for bad input or a sweep in
  out_dir that is not this one, before any run."""
  start = time.perf_counter()
  config_lib.check(config)
  beam = None
  if runner != "local":
    beam = (runner, beam_lib.check(runner, beam_options))
  elif beam_options:
    raise errors.UsageError("--beam_options apply to a Beam --runner, not to local")
  with _locked(config.out_dir):
    return _run(config, steps, progress or _log_progress, notify or logging.info, start, beam)


def _run(config: config_lib.Config, steps: Sequence[Step], progress: Progress, notify: Notify,
         start: float, runner=None) -> Summary:
  specs = config_lib.plan_runs(config)
  wanted = config_lib.definition(config, [s.name for s in steps])
  state = _existing(config, wanted)
  out = config.out_dir
  jsonl, csv_path = os.path.join(out, ROWS_JSONL), os.path.join(out, ROWS_CSV)
  if state is None:
    baseline = measure_original(config, notify)
    auto = None
    if config_lib.AUTO in config.round_to:
      notify("sweep: resolving round_to=auto (a minute the first time on a machine)")
      auto = resolve_auto(config, baseline["device"])
      notify(f"sweep: round_to=auto: {auto['how']}")
    state = {"schema": SCHEMA, "created": _now(), "definition": wanted,
             "round_to_auto": auto, "baseline": baseline}
    files.write_json(os.path.join(out, SWEEP_JSON), state)
  os.makedirs(os.path.join(out, config_lib.MODELS_DIR), exist_ok=True)
  done, good_bytes, torn = rows_lib.read(jsonl)
  if torn:
    notify(f"sweep: dropped a torn last line of {jsonl} (its run runs again)")
    rows_lib.truncate(jsonl, good_bytes)
  planned = {s.key for s in specs}
  strays = [r["key"] for r in done if r["key"] not in planned]
  if strays:
    raise errors.InputError(f"'{jsonl}' has rows that are not in this sweep ({strays[0]}); "
                            "pass --overwrite to start over")
  cols = rows_lib.columns(config.batch_sizes, config.data is not None,
                          [c for s in steps for c in s.columns],
                          reconstruct=config.reconstruct is not None,
                          quantize=config.quantize != ("none",), budget=config.budgeted)
  rows_lib.write_csv(csv_path, done, cols)  # a kill may have come between the two writes
  finished = {r["key"] for r in done}
  skipped = len(finished)
  notify(f"sweep: resuming, {skipped} of {len(specs)} runs already in {jsonl}" if skipped
         else f"sweep: {len(specs)} runs into {out}")
  new = 0
  if runner is not None:
    todo = [spec for spec in specs if spec.key not in finished]
    notify(f"sweep: {len(todo)} runs on Beam's {runner[0]}")
    beam_lib.run(functools.partial(prepare_run, config, state=state, cols=cols, steps=steps),
                 functools.partial(finish_run, config, state), todo, runner[1], jsonl)
    done, _, _ = rows_lib.read(jsonl)
    rows_lib.write_csv(csv_path, done, cols)
    new = len(done) - skipped
    for i, row in enumerate(done[skipped:], skipped + 1):
      progress(i, len(specs), row, time.perf_counter() - start)
  for i, spec in enumerate(specs, 1):
    if runner is not None or spec.key in finished:
      continue
    row = run_one(config, spec, state, cols, steps)
    rows_lib.append(jsonl, row)
    done.append(row)
    rows_lib.write_csv(csv_path, done, cols)
    new += 1
    progress(i, len(specs), row, time.perf_counter() - start)
  paths = plots.write_all(done, config.batch_sizes, config_lib.model_name(config.model),
                          os.path.join(out, PLOTS_DIR))
  tensorboard.write_all(done, os.path.join(out, TENSORBOARD_DIR))
  return Summary(out, len(specs), skipped, new,
                 sum(r.get("status") != rows_lib.STATUS_OK for r in done), torn,
                 state.get("round_to_auto"), tuple(paths), time.perf_counter() - start)


def plots_only(out_dir: str) -> list[str]:
  """Re-creates the plots of the sweep in out_dir from its rows."""
  sweep_json = os.path.join(out_dir, SWEEP_JSON)
  if not os.path.isfile(sweep_json):
    raise errors.InputError(f"--out_dir '{out_dir}' holds no sweep ({SWEEP_JSON} is missing)")
  state = _read_json(sweep_json)
  done, _, _ = rows_lib.read(os.path.join(out_dir, ROWS_JSONL))
  d = state["definition"]
  return plots.write_all(done, d["batch_sizes"], config_lib.model_name(d["model"]),
                         os.path.join(out_dir, PLOTS_DIR))
