"""XLA on a GPU through JAX: pruned ONNX models against their originals.

Runs only where JAX with a GPU is present (--norequire_gpu lets it run on
JAX's CPU backend, for trying it out). JAX is not in
third_party/requirements.txt, so no measurement here is part of `bazel test
//...` (tests/gpu_xla_test.py checks the stripping and refilling without
JAX). It imports neither TensorFlow nor graph_prune: it needs numpy, onnx,
jax and absl, and onnxruntime for the check. The graphs come from
benchmarks/gpu_xla_prepare.py, which strips the large weights:

  # here:        bazel run //benchmarks:gpu_xla_prepare -- --out_dir=DIR
  # on the GPU, from the repository root (or a copy of benchmarks/ and DIR):
  #              python3 -m benchmarks.gpu_xla --dir=DIR --batch_sizes=1,32 --json=r.json

Each graph becomes a JAX function through benchmarks/onnx_jax.py (exactly the
ops these CNNs hold; anything else is refused), jitted and compiled by XLA for
the GPU, with the weights as arguments. Stripped initializers are refilled
with seeded random values (He-normal by fan-in for the weights of Conv, Gemm
and MatMul, N(0, 0.1) otherwise): the latency of dense convolutions and matrix
products does not depend on the values.

Before any timing, each model's jitted evaluator is compared with ONNX Runtime
(CPU provider) on the same refilled weights and the same random input, on the
logits (the input of the final Softmax) and on the output; a model whose
largest relative difference exceeds the precision's tolerance is not timed.

Timing, per model pair, batch size and matmul precision: compile time (lower +
compile, cuDNN autotuning included), warm-up (at least 10 pairs and 1 s),
then alternating pairs (original, pruned; the order flips every pair), each
call timed on the host clock to `block_until_ready`, inputs rotated among four
buffers. Reported: median latencies, the per-pair speedup median and its
p10-p90, efficiency = speedup / FLOPs ratio (FLOPs from the pruning report, in
manifest.json), XLA's memory analysis of each executable (arguments +
temporaries + outputs), the original timed against itself the same way (the
noise floor, ideally 1.00x), and the dispatch floor (a call with the same
weight arguments that does no work). Pruned variants that are the same graph
(round_to 8 where every kept width is already a multiple of 8) are measured
once. The manifest's first ratio (filter pruning) is timed at every precision
first, the other ratios and the layer-mode variants (--layer_ratios of the
preparation, each with filter pruning to the same FLOPs) at the first
precision; --budget_s leaves out what does not fit.

Precision: 'highest' is true float32 arithmetic in every convolution and
matrix product; 'default' is JAX's default, which on Ampere and later GPUs lets
cuDNN/cuBLAS use TF32 tensor cores for float32.
"""

import json
import os
import sys
import time

from absl import app
from absl import flags
from absl import logging
import numpy as np

from benchmarks import onnx_jax
from graph_prune.bench import timing

_DIR = flags.DEFINE_string("dir", None, "Folder from gpu_xla_prepare.py (manifest.json).")
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["1", "32"], "Batch sizes.")
_PRECISIONS = flags.DEFINE_list("precisions", ["highest", "default"],
                                "jax_default_matmul_precision values, in order of priority.")
_SECONDS = flags.DEFINE_float("seconds", 6.0, "Timed seconds per model pair and configuration.")
_MIN_PAIRS = flags.DEFINE_integer("min_pairs", 40, "Fewest timed pairs.")
_MAX_PAIRS = flags.DEFINE_integer("max_pairs", 1000, "Most timed pairs.")
_BUDGET = flags.DEFINE_float("budget_s", 480.0,
                             "Skip configurations that would start after this many seconds.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the refilled weights and the inputs.")
_ORT_CUDA = flags.DEFINE_bool("ort_cuda", True, "Also time ONNX Runtime's CUDA provider if present.")
_JSON = flags.DEFINE_string("json", None, "Write every figure here.")
_REQUIRE_GPU = flags.DEFINE_bool("require_gpu", True, "Refuse to run where JAX sees no GPU.")

# Largest relative difference to ONNX Runtime (CPU, float32) accepted per precision.
TOLERANCE = {"highest": 1e-3, "float32": 1e-3, "default": 3e-2, "tensorfloat32": 3e-2}


# ---------------------------------------------------------------- check


def _logits_name(model):
  """The input of the Softmax that makes the graph output, or None."""
  producer = {o: n for n in model.graph.node for o in n.output}
  name = model.graph.output[0].name
  while name in producer:
    node = producer[name]
    if node.op_type == "Softmax":
      return node.input[0]
    if node.op_type not in ("Identity", "Reshape", "Squeeze", "Flatten"):
      return None
    name = node.input[0]
  return None


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30))


def check_against_ort(model, precision, x):
  """{'logits': rel diff, 'output': rel diff} of the jitted evaluator against ORT CPU."""
  import jax  # pylint: disable=g-import-not-at-top
  import onnx  # pylint: disable=g-import-not-at-top
  import onnxruntime  # pylint: disable=g-import-not-at-top
  logits = _logits_name(model)
  probe = onnx.ModelProto()
  probe.CopyFrom(model)
  if logits:
    probe.graph.output.add(name=logits)
  sess = onnxruntime.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
  expected = sess.run(None, {sess.get_inputs()[0].name: x})
  ev = onnx_jax.Evaluator(model, extra_outputs=[logits] if logits else [])
  weights = jax.device_put(ev.weights)
  with jax.default_matmul_precision(precision):
    got = jax.jit(ev)(weights, jax.device_put(x))
  got = [np.asarray(g) for g in got]
  out = {"output": _rel(got[0], expected[0])}
  if logits:
    out["logits"] = _rel(got[-1], expected[-1])
  out["finite"] = bool(all(np.all(np.isfinite(g)) for g in got))
  return out


# ---------------------------------------------------------------- timing


def _compile(ev, weights, x, precision):
  """(compiled executable, compile seconds, XLA memory analysis in bytes)."""
  import jax  # pylint: disable=g-import-not-at-top
  t0 = time.perf_counter()
  with jax.default_matmul_precision(precision):
    compiled = jax.jit(ev).lower(weights, x).compile()
  seconds = time.perf_counter() - t0
  memory = {}
  try:
    m = compiled.memory_analysis()
    memory = {"argument_bytes": int(m.argument_size_in_bytes),
              "temp_bytes": int(m.temp_size_in_bytes),
              "output_bytes": int(m.output_size_in_bytes),
              "total_bytes": int(m.argument_size_in_bytes + m.temp_size_in_bytes
                                 + m.output_size_in_bytes - m.alias_size_in_bytes)}
  except Exception as e:  # pylint: disable=broad-except
    memory = {"error": f"{type(e).__name__}: {e}"[:200]}
  return compiled, seconds, memory


def _pairs(call_a, call_b, inputs, seconds, min_pairs, max_pairs):
  """Timed pairs through the project's timing loop (one call of each per round, in
  a seeded shuffled order), the inputs cycling; returns (latencies a, latencies b)
  in seconds."""
  def feeding(call):
    count = [0]

    def run():
      call(inputs[count[0] % len(inputs)])
      count[0] += 1
    return run
  settings = timing.Settings(warmup=10, min_runs=min_pairs, max_runs=max_pairs,
                             max_seconds=seconds / 2, target_rse=0.002)
  result = timing.measure([feeding(call_a), feeding(call_b)], settings, label="gpu_xla")
  return np.array(result.times[0]), np.array(result.times[1])


def _summary(a, b):
  ratio = a / b
  return {"pairs": int(len(a)),
          "latency_ms": {"original": 1e3 * float(np.median(a)), "pruned": 1e3 * float(np.median(b)),
                         "original_p90": 1e3 * float(np.percentile(a, 90)),
                         "pruned_p90": 1e3 * float(np.percentile(b, 90))},
          "speedup": {"median": float(np.median(ratio)), "p10": float(np.percentile(ratio, 10)),
                      "p90": float(np.percentile(ratio, 90))}}


def _inputs(shape, batch, seed):
  rng = np.random.default_rng(seed)
  return [rng.uniform(-1, 1, (batch, *shape[1:])).astype(np.float32) for _ in range(4)]


def time_xla(original, pruned, batch, precision, args, cache=None):
  """Times pruned against original. cache (a dict) keeps each model's weights on the
  device and its executable for this batch and precision, keyed by the model's name in
  the manifest, so that an original paired with several variants compiles once."""
  import jax  # pylint: disable=g-import-not-at-top
  cache = {} if cache is None else cache

  def ready(name, model):
    key = (name, batch, precision)
    if key not in cache:
      ev = onnx_jax.Evaluator(model)
      w = jax.device_put(ev.weights)
      x = jax.device_put(_inputs(ev.input_shape, batch, args["seed"] + batch)[0])
      cache[key] = (ev, w, _compile(ev, w, x, precision))
    return cache[key]

  (ev_a, w_a, c_a), (_, w_b, c_b) = ready(*original), ready(*pruned)
  weights, compiled = [w_a, w_b], [c_a, c_b]
  xs = [jax.device_put(x) for x in _inputs(ev_a.input_shape, batch, args["seed"] + batch)]
  calls = [lambda x, c=c, w=w: c(w, x)[0].block_until_ready()
           for (c, _, _), w in zip(compiled, weights)]
  a, b = _pairs(calls[0], calls[1], xs, args["seconds"], args["min_pairs"], args["max_pairs"])
  out = _summary(a, b)
  out["compile_s"] = {"original": compiled[0][1], "pruned": compiled[1][1]}
  out["xla_memory"] = {"original": compiled[0][2], "pruned": compiled[1][2]}
  # Noise floor: the original against itself, timed the same way (ideally 1.00).
  a, b = _pairs(calls[0], calls[0], xs, args["seconds"] / 3, args["min_pairs"], args["max_pairs"])
  out["self_speedup"] = _summary(a, b)["speedup"]
  # Dispatch floor: a call with the same weight arguments that does no work.
  floor = jax.jit(lambda w, x: x[:1, :1, :1, :1], keep_unused=True).lower(weights[0], xs[0]).compile()
  times = []
  for i in range(300):
    t0 = time.perf_counter()
    floor(weights[0], xs[i % len(xs)]).block_until_ready()
    times.append(time.perf_counter() - t0)
  out["dispatch_floor_ms"] = 1e3 * float(np.median(times[50:]))
  return out


def time_ort_cuda(original, pruned, batch, args):
  import onnxruntime  # pylint: disable=g-import-not-at-top
  sessions = [onnxruntime.InferenceSession(m.SerializeToString(),
                                           providers=["CUDAExecutionProvider"])
              for m in (original, pruned)]
  name = sessions[0].get_inputs()[0].name
  shape = [d if isinstance(d, int) else None for d in sessions[0].get_inputs()[0].shape]
  xs = _inputs(shape, batch, args["seed"] + batch)
  calls = [lambda x, s=s: s.run(None, {name: x}) for s in sessions]
  a, b = _pairs(calls[0], calls[1], xs, args["seconds"], args["min_pairs"], args["max_pairs"])
  out = _summary(a, b)
  out["providers"] = sessions[1].get_providers()
  return out


# ---------------------------------------------------------------- driver


def _environment():
  import jax  # pylint: disable=g-import-not-at-top
  import jaxlib  # pylint: disable=g-import-not-at-top
  import onnx  # pylint: disable=g-import-not-at-top
  env = {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "onnx": onnx.__version__,
         "devices": [f"{d.platform}:{d.device_kind}" for d in jax.devices()],
         "python": sys.version.split()[0]}
  try:
    import onnxruntime  # pylint: disable=g-import-not-at-top
    env["onnxruntime"] = onnxruntime.__version__
    env["onnxruntime_providers"] = onnxruntime.get_available_providers()
  except ImportError:
    env["onnxruntime"] = None
  return env


def _row(name, label, batch, precision, flops_ratio, r):
  s, lat, c = r["speedup"], r["latency_ms"], r.get("compile_s")
  compile_s = f"{c['original']:.1f} / {c['pruned']:.1f}" if c else "-"
  return (f"| {name} | {label} | {batch} | {precision} | {flops_ratio:.2f}x | "
          f"{s['median']:.2f}x [{s['p10']:.2f}-{s['p90']:.2f}] | "
          f"{s['median'] / flops_ratio:.2f} | {lat['original']:.3f} / {lat['pruned']:.3f} | "
          f"{compile_s} | {r['self_speedup']['median']:.3f}x | {r['dispatch_floor_ms']:.3f} | "
          f"{r['pairs']} |")


def run(directory, batch_sizes, precisions, args, report):
  """Checks and times every model pair; fills and returns report."""
  import jax  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  with open(os.path.join(directory, "manifest.json")) as f:
    manifest = json.load(f)
  report.update(environment=_environment(), manifest=manifest, checks={}, xla=[], ort_cuda=[])
  if args["require_gpu"] and jax.devices()[0].platform != "gpu":
    raise SystemExit(f"gpu_xla: JAX sees no GPU ({report['environment']['devices']}); "
                     "--norequire_gpu to run anyway")
  logging.info("environment: %s", report["environment"])
  has_ort_cuda = "CUDAExecutionProvider" in report["environment"].get("onnxruntime_providers", [])
  report["ort_cuda_available"] = has_ort_cuda
  models = {}
  for name, entry in manifest["models"].items():
    files = [entry["original"]] + sorted({p["file"] for p in entry["pruned"].values()})
    for file in files:
      model, refilled = onnx_jax.load(os.path.join(directory, file), args["seed"])
      ev = onnx_jax.Evaluator(model)
      logging.info("%s: %d values refilled; ops %s", file, refilled, ev.op_counts)
      x = _inputs(ev.input_shape, 2, args["seed"] + 7)[0]
      checks = {}
      for precision in precisions:
        checks[precision] = check_against_ort(model, precision, x)
        checks[precision]["tolerance"] = TOLERANCE.get(precision, 1e-3)
        ok = (checks[precision]["finite"]
              and max(checks[precision].get("logits", 0), checks[precision]["output"])
              <= checks[precision]["tolerance"])
        checks[precision]["passed"] = bool(ok)
        logging.info("%s vs ONNX Runtime CPU at %s: %s", file, precision, checks[precision])
      report["checks"][file] = {"refilled_values": refilled, "ops": ev.op_counts, **checks}
      models[file] = model
  # The primary ratio at every precision first, then the other ratios at the first
  # precision: what is left out when the time budget runs short is the least needed.
  primary = manifest["ratios"][0]

  def is_primary(p):
    return p["ratio"] == primary and p.get("mode", "filter") == "filter"

  work = [(precision, batch, name, key)
          for precision in precisions for batch in batch_sizes
          for name, entry in manifest["models"].items()
          for key, p in entry["pruned"].items() if is_primary(p)]
  work += [(precisions[0], batch, name, key)
           for batch in batch_sizes for name, entry in manifest["models"].items()
           for key, p in entry["pruned"].items() if not is_primary(p)]
  rows, measured, cache = [], {}, {}
  for precision, batch, name, key in work:
    entry = manifest["models"][name]
    p = entry["pruned"][key]
    ratio = p["flops_before"] / p["flops_after"]
    row = {"model": name, "variant": key, "label": p["label"], "pruning_ratio": p["ratio"],
           "file": p["file"], "batch": batch, "precision": precision, "flops_ratio": ratio}
    if time.perf_counter() - start > args["budget_s"]:
      logging.warning("time budget spent: %s %s batch %d %s not run", name, key, batch, precision)
      row["skipped"] = "time budget spent"
      report["xla"].append(row)
      continue
    if not all(report["checks"][f][precision]["passed"] for f in (entry["original"], p["file"])):
      row["skipped"] = "evaluator does not match ONNX Runtime"
      report["xla"].append(row)
      continue
    done = measured.get((p["file"], batch, precision))
    if done:  # the same graph as another variant: one measurement serves both
      row.update({k: v for k, v in done.items() if k not in row})
      row["same_measurement_as"] = done["variant"]
    else:
      # Only this item's original stays compiled; the rest goes, XLA's caches with it.
      stale = [k for k in cache if k != (entry["original"], batch, precision)]
      for k in stale:
        del cache[k]
      if stale:
        jax.clear_caches()
      row.update(time_xla((entry["original"], models[entry["original"]]),
                          (p["file"], models[p["file"]]), batch, precision, args, cache))
      measured[(p["file"], batch, precision)] = row
    report["xla"].append(row)
    rows.append(_row(name, f"{p['ratio']} / {p['label']}", batch, precision, ratio, row))
    logging.info("%s", rows[-1])
  if has_ort_cuda and args["ort_cuda"]:
    for batch in batch_sizes:
      for name, entry in manifest["models"].items():
        for p in {p["file"]: p for p in entry["pruned"].values()}.values():
          if time.perf_counter() - start > args["budget_s"]:
            continue
          r = time_ort_cuda(models[entry["original"]], models[p["file"]], batch, args)
          r.update(model=name, file=p["file"], batch=batch,
                   flops_ratio=p["flops_before"] / p["flops_after"])
          report["ort_cuda"].append(r)
  try:
    stats = jax.devices()[0].memory_stats() or {}
    report["device_peak_bytes_in_use"] = int(stats.get("peak_bytes_in_use", -1))
  except Exception:  # pylint: disable=broad-except
    pass
  report["wall_s"] = time.perf_counter() - start
  return rows


def main(argv):
  del argv
  args = {"seed": _SEED.value, "seconds": _SECONDS.value, "min_pairs": _MIN_PAIRS.value,
          "max_pairs": _MAX_PAIRS.value, "budget_s": _BUDGET.value, "ort_cuda": _ORT_CUDA.value,
          "require_gpu": _REQUIRE_GPU.value}
  report = {"args": args}
  try:
    rows = run(_DIR.value, [int(b) for b in _BATCH_SIZES.value], _PRECISIONS.value, args, report)
  finally:
    if _JSON.value:
      with open(_JSON.value, "w") as f:
        json.dump(report, f, indent=1, sort_keys=True)
        f.write("\n")
  print("| model | variant | batch | precision | FLOPs ratio | speedup median [p10-p90] | "
        "efficiency | latency ms original / pruned | compile s original / pruned | "
        "original vs itself | dispatch floor ms | pairs |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    print(r)
  for file, c in report["checks"].items():
    print(file, {k: v for k, v in c.items() if k != "ops"})
  for r in report["ort_cuda"]:
    print("ORT CUDA", r["model"], r["file"], r["batch"], r["speedup"], r["latency_ms"])
  print("ORT CUDA available:", report["ort_cuda_available"])


if __name__ == "__main__":
  flags.mark_flag_as_required("dir")  # here, so that tests can import the module
  app.run(main)
