"""Benchmark of a (pruned) model against its baseline: speed, memory, size.

`run(Options(...))` returns the report below; `text(report)` is its table and
`write(report, path)` writes it as JSON. TensorFlow models (GraphDef .pb/.pbtxt
or SavedModel directory) run XLA-compiled (`tf.function(jit_compile=True)`) or,
with xla=False, as plain TensorFlow; ONNX models run in ONNX Runtime.

Timing: one process holds every model compiled; per batch size the models are
called in alternation, baseline then candidate (A B A B ...), after warm-up,
until every median latency and the median speedup have a relative standard
error below the target, or the time budget (max_seconds per model) is spent.
Memory: a fresh child process per model and batch size (see memory.py).

Report (JSON), schema "graph_prune.bench/1":

  schema      "graph_prune.bench/1"
  date        UTC time of the run, ISO 8601
  device      device label of the candidate, e.g. "cpu:0", "gpu:0"
  device_name what that device is (CPU model and cores, GPU name)
  xla         whether TensorFlow models were XLA-compiled (ONNX models: n/a)
  versions    {python, numpy, tensorflow?, onnx?, onnxruntime?}
  settings    {batch_sizes, warmup, min_runs, max_runs, max_seconds, target_rse,
               memory, memory_runs, seed}
  models      {"baseline"?, "candidate"}: per model
    path        as given
    format      "graphdef", "graphdef_text", "saved_model" or "onnx"
    runtime     "tensorflow-xla", "tensorflow" or "onnxruntime"
    device      device label this model ran on
    inputs      [{name, shape, dtype}] (a null size: unknown, the batch)
    outputs     [tensor names]
    const_bytes bytes on disk: file, SavedModel directory, or ONNX file plus
                its external data
    build_s     seconds to load the model and build its callable or session
    batches     {"<batch size>": per batch size
      compile_s      seconds of the first call (TF: trace + XLA compile + run;
                     ORT: shape-specific set-up + run)
      latency_ms     {median, p10, p90} in ms over the n timed calls, and rse,
                     the median's relative standard error (a fraction)
      throughput     samples per second at the median latency
      peak_bytes     peak memory of a fresh process running this model at
                     this batch size (see memory.py): device memory on GPU/TPU,
                     host RSS above the post-import baseline on CPU; null where
                     not measured
      peak_method    "device_allocator", "vmhwm_reset", "vmhwm_minus_rss",
                     "unavailable", "not measured" or "failed: ..."
      host_peak_bytes  host RSS peak above the baseline (all devices)
      resident_bytes   host RSS above the baseline after the runs: what the
                     loaded, compiled model keeps (the peak also holds the
                     transient copies made while loading and compiling)
      output_shapes  shapes of the outputs at this batch size
      converged      whether the loop reached the target before the budget
    }
  pairs       {"<batch size>": present with a baseline
    speedup      {median, p10, p90, n}: baseline time / candidate time of each
                 A-B round, summarised over the rounds
    converged    as above
    elapsed_s    seconds spent in the timed loop
  }
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import time
from typing import Any, Optional, Sequence

from absl import logging
import numpy as np

from graph_prune import errors
from graph_prune import files
from graph_prune.bench import memory
from graph_prune.bench import runners
from graph_prune.bench import timing

SCHEMA = "graph_prune.bench/1"


@dataclasses.dataclass(frozen=True)
class Options:
  model: str
  baseline: Optional[str] = None
  batch_sizes: tuple[int, ...] = (1,)
  device: str = "auto"
  xla: bool = True
  timing: timing.Settings = timing.Settings()
  memory: bool = True
  memory_runs: int = 3
  seed: int = 0
  signature: Optional[str] = None
  inputs: tuple[str, ...] = ()
  outputs: tuple[str, ...] = ()
  report: Optional[str] = None
  overwrite: bool = False


def parse_batch_sizes(values: Sequence[str]) -> tuple[int, ...]:
  """'1', '8', '32' -> (1, 8, 32); anything but positive integers is a UsageError."""
  out = []
  for v in values:
    v = str(v).strip()
    if not v.isdecimal() or int(v) < 1:
      raise errors.UsageError(f"--batch_sizes: '{v}' is not a positive integer; give e.g. "
                              "--batch_sizes=1,8,32")
    if int(v) not in out:
      out.append(int(v))
  if not out:
    raise errors.UsageError("--batch_sizes is empty; give e.g. --batch_sizes=1,8,32")
  return tuple(out)


def check(options: Options) -> None:
  """Cheap checks before any framework import: paths, batch sizes, device, report."""
  for flag, path in (("--model", options.model), ("--baseline", options.baseline)):
    if path is not None and not os.path.exists(path):
      raise errors.InputError(f"{flag} '{path}' does not exist; give a .pb/.pbtxt GraphDef, a "
                              "SavedModel directory or an .onnx file")
  if not options.batch_sizes or any(not isinstance(b, int) or b < 1
                                    for b in options.batch_sizes):
    raise errors.UsageError(f"batch sizes must be positive integers, not {options.batch_sizes}")
  runners.check_device(options.device)
  if options.memory_runs < 0:
    raise errors.UsageError("--memory_runs must be >= 0")
  if options.report:
    parent = os.path.dirname(os.path.abspath(options.report))
    if not os.path.isdir(parent):
      raise errors.UsageError(f"--report: directory '{parent}' does not exist")
    if os.path.exists(options.report) and not options.overwrite:
      raise errors.UsageError(f"--report '{options.report}' exists; pass --overwrite to "
                              "replace it")


@dataclasses.dataclass(frozen=True)
class _Model:
  role: str
  loaded: runners.Loaded
  device: runners.Device
  build_s: float


def run(options: Options) -> dict[str, Any]:
  """Benchmarks options.model (and options.baseline) and returns the report.

  Raises a GraphPruneError subclass on bad input (before any timing starts).
  """
  check(options)
  roles = [("baseline", options.baseline)] if options.baseline else []
  roles.append(("candidate", options.model))
  date = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()

  # Load and resolve every model first: bad input fails before any work is timed.
  loaded, load_s = [], []
  for role, path in roles:
    t0 = time.perf_counter()
    loaded.append((role, runners.load(path, options.signature, options.inputs, options.outputs)))
    load_s.append(time.perf_counter() - t0)
  devices = [runners.resolve_device(options.device, runners.format_of(l.path))
             for _, l in loaded]
  models, built = [], []
  for (role, l), device, seconds in zip(loaded, devices, load_s):
    logging.info("bench: building %s (%s, %s on %s)", role, l.path,
                 runners.runtime_name(l.format, options.xla), device.label)
    t0 = time.perf_counter()
    built.append(runners.build(l, device, options.xla))
    models.append(_Model(role, l, device, seconds + time.perf_counter() - t0))
  for runner in built:  # shape problems (fixed batch, unknown sizes) before any timing
    for b in options.batch_sizes:
      runners.random_inputs(runner.inputs, b, options.seed)

  per_model = {m.role: _model_doc(m, r, options) for m, r in zip(models, built)}
  pairs = {}
  for b in options.batch_sizes:
    pair = _time_batch(b, models, built, options, per_model)
    if pair:
      pairs[str(b)] = pair
  # Memory is measured in fresh child processes: this one's models can go.
  del built, runner
  for m in models:
    for b in options.batch_sizes:
      per_model[m.role]["batches"][str(b)].update(_peak(m, b, options))

  candidate = models[-1]
  doc = {
      "schema": SCHEMA,
      "date": date,
      "device": candidate.device.label,
      "device_name": runners.describe(candidate.device, candidate.loaded.format),
      "xla": options.xla,
      "versions": runners.versions([m.loaded.format for m in models]),
      "settings": {
          "batch_sizes": list(options.batch_sizes), "warmup": options.timing.warmup,
          "min_runs": options.timing.min_runs, "max_runs": options.timing.max_runs,
          "max_seconds": options.timing.max_seconds, "target_rse": options.timing.target_rse,
          "memory": options.memory, "memory_runs": options.memory_runs, "seed": options.seed},
      "models": per_model,
      "pairs": pairs,
  }
  if options.report:
    write(doc, options.report)
  return doc


def _time_batch(b: int, models: Sequence[_Model], built: Sequence[Any], options: Options,
                per_model: dict[str, Any]) -> Optional[dict[str, Any]]:
  """Compiles every model at batch size b, times them in alternation, fills
  per_model[role]["batches"][b]; returns the pair entry with two models."""
  bounds = []
  for m, runner in zip(models, built):
    logging.info("bench: %s batch %d: compiling", m.role, b)
    bound = runner.bind(b, options.seed)
    t0 = time.perf_counter()
    outs = bound.fetch()
    per_model[m.role]["batches"][str(b)] = {
        "compile_s": time.perf_counter() - t0,
        "output_shapes": [list(np.shape(o)) for o in outs],
    }
    bounds.append(bound)
  label = f"batch {b}"
  logging.info("bench: %s: timing %s", label, " vs ".join(m.role for m in models))
  result = timing.measure([x.call for x in bounds], options.timing, label=label)
  for m, times in zip(models, result.times):
    lat = timing.summarise(times)
    per_model[m.role]["batches"][str(b)].update(
        latency_ms=lat.to_json(1e3), throughput=b / lat.median if lat.median > 0 else None,
        converged=result.converged)
  s = timing.speedup(result)
  if s is None:
    return None
  logging.info("bench: %s: speedup %.3f (p10 %.3f, p90 %.3f, %d pairs)", label, s.median,
               s.p10, s.p90, s.n)
  return {"speedup": {"median": s.median, "p10": s.p10, "p90": s.p90, "n": s.n},
          "converged": result.converged, "elapsed_s": result.elapsed_s}


def _peak(m: _Model, b: int, options: Options) -> dict[str, Any]:
  if not options.memory:
    return {"peak_bytes": None, "peak_method": "not measured", "host_peak_bytes": None,
            "resident_bytes": None}
  logging.info("bench: %s batch %d: peak memory (child process)", m.role, b)
  peak = memory.measure(memory.Request(
      m.loaded.path, m.device.label, b, options.xla, options.memory_runs, options.seed,
      options.signature, options.inputs, options.outputs))
  return {"peak_bytes": peak.peak_bytes, "peak_method": peak.method,
          "host_peak_bytes": peak.host_peak_bytes, "resident_bytes": peak.resident_bytes}


def _model_doc(m: _Model, runner, options: Options) -> dict[str, Any]:
  return {
      "path": m.loaded.path,
      "format": m.loaded.format,
      "runtime": runners.runtime_name(m.loaded.format, options.xla),
      "device": m.device.label,
      "inputs": [{"name": i.name, "dtype": i.dtype,
                  "shape": None if i.shape is None else
                           [d if isinstance(d, int) and d >= 0 else None for d in i.shape]}
                 for i in runner.inputs],
      "outputs": list(runner.outputs),
      "const_bytes": runners.size_on_disk(m.loaded),
      "build_s": m.build_s,
      "batches": {},
  }


def write(doc: dict[str, Any], path: str) -> None:
  """Writes the report as JSON, atomically."""
  files.write_json(path, doc)


def _mib(n: Optional[int]) -> str:
  return "-" if n is None else f"{n / 2**20:.1f}"


def text(doc: dict[str, Any]) -> str:
  """The report as a table."""
  lines = [f"graph_prune bench: {doc['device']} ({doc['device_name']}), {doc['date']}"]
  for role, m in doc["models"].items():
    lines.append(f"  {role}: {m['path']} ({m['format']}, {m['runtime']} on {m['device']})")
  lines.append("")
  header = (f"{'model':10} {'batch':>5} {'compile s':>9} {'median ms':>10} {'p90 ms':>9} "
            f"{'samples/s':>10} {'peak MiB':>9} {'disk MiB':>9}  runs")
  lines += [header, "-" * len(header)]
  models = doc["models"]
  for b in doc["settings"]["batch_sizes"]:
    for role, m in models.items():
      e = m["batches"][str(b)]
      lat = e["latency_ms"]
      lines.append(
          f"{role:10} {b:>5} {e['compile_s']:>9.2f} {lat['median']:>10.3f} {lat['p90']:>9.3f} "
          f"{e['throughput']:>10.1f} {_mib(e['peak_bytes']):>9} {_mib(m['const_bytes']):>9}  "
          f"{lat['n']}{'' if e['converged'] else '*'}")
  if doc["pairs"]:
    lines += ["", "speedup = baseline time / candidate time, per A-B pair:"]
    for b in doc["settings"]["batch_sizes"]:
      p = doc["pairs"][str(b)]
      s = p["speedup"]
      lines.append(f"  batch {b:>4}: {s['median']:.3f}x  (p10 {s['p10']:.3f}, p90 {s['p90']:.3f}, "
                   f"{s['n']} pairs){'' if p['converged'] else '  *'}")
  if any(not e["converged"] for m in models.values() for e in m["batches"].values()):
    lines += ["", f"* time budget spent before the medians reached "
                  f"{doc['settings']['target_rse']:.0%} relative standard error"]
  return "\n".join(lines)
