"""Pruning and quantization together, measured: the built-in model, unpruned and
pruned (each pruning ratio recovered by lsq reconstruction and then training, as
--recover_flags say), converted by //tools:prune --ratio=0 to ONNX (float32, and
--quantize=float16, int8, codebook8, codebook4) and to LiteRT (float32, float16,
int8): file size on disk, top-1 on the 10,000 Fashion-MNIST test images,
agreement with its float model on the held-out calibration samples, and the A/B
speedup against the float32 original in the same runtime (ONNX Runtime or the
LiteRT interpreter, on the CPU; graph_prune.bench, order randomised per round).

  bazel run //benchmarks:quantize -- [--ratios=0,0.5,0.75] [--json=rows.json]
      [--plot=quantize.png]

Calibration: the first 2,048 training images (no labels), 500 more held out.
"""

import json
import os
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags

_RATIOS = flags.DEFINE_list("ratios", ["0", "0.5", "0.75"], "Pruning ratios (0: unpruned).")
_SCHEMES = flags.DEFINE_list("schemes", ["float32", "float16", "int8", "codebook8", "codebook4"],
                             "float32 (no quantization) and --quantize schemes.")
_RECOVER = flags.DEFINE_list(
    "recover_flags", ["--recover=distill", "--recover_train_steps=3000", "--learning_rate=2e-3"],
    "//tools:prune flags of the recovery after lsq (pruned ratios).")
_LITERT = flags.DEFINE_list("litert_schemes", ["float32", "float16", "int8"],
                            "LiteRT rows (empty: none).")
_CALIBRATION = flags.DEFINE_string("calibration", "minmax", "int8 calibration method.")
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["1", "32"], "Benchmark batch sizes.")
_MAX_SECONDS = flags.DEFINE_float("max_seconds", 10.0, "Timing budget per batch size.")
_JSON = flags.DEFINE_string("json", None, "Write the rows as JSON here.")
_PLOT = flags.DEFINE_string("plot", None, "Write top-1 vs speedup and vs file size here (PNG).")
_WORK = flags.DEFINE_string("work_dir", None, "Keep the models here (default: a temp dir).")
_REUSE = flags.DEFINE_boolean("reuse_pruned", False, "Use the recovered models r<ratio>.pb "
                              "already in --work_dir (to add schemes to a run's rows).")

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_DEFAULT = os.path.join(_ROOT, "models", "default", "fmnist_vgg_bn.pb")
_CALIB = ["--calibration_data=fashion-mnist:train", "--calibration_samples=2048",
          "--calibration_holdout=500", "--scale=1/255"]


def _prune(*args) -> tuple[float, dict]:
  """Runs //tools:prune (a child process: the whole command) and returns its wall
  time and report."""
  report = tempfile.mktemp(suffix=".json")
  cmd = [sys.executable, os.path.join(_ROOT, "tools", "prune.py"), *args, f"--report={report}",
         "--overwrite"]
  env = dict(os.environ, PYTHONPATH=_ROOT, TF_CPP_MIN_LOG_LEVEL="3")
  t0 = time.perf_counter()
  res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
  seconds = time.perf_counter() - t0
  if res.returncode:
    raise SystemExit(f"prune failed: {res.stderr.strip().splitlines()[-1]}")
  with open(report, encoding="utf-8") as f:
    doc = json.load(f)
  os.remove(report)
  return seconds, doc


def _pruned(work: str, ratio: float) -> tuple[str, float, dict]:
  """The pruned, reconstructed and recovered TensorFlow model (the original at 0)."""
  if ratio == 0:
    return _DEFAULT, 0.0, {}
  out = os.path.join(work, f"r{ratio}.pb")
  if _REUSE.value and os.path.exists(out):
    return out, 0.0, {}
  seconds, doc = _prune(f"--in={_DEFAULT}", f"--out={out}", f"--ratio={ratio}", *_CALIB,
                        "--reconstruct=lsq", "--recover_data=fashion-mnist:train",
                        "--holdout_samples=500", *_RECOVER.value)
  return out, seconds, doc


def _convert(work: str, ratio: float, pb: str, runtime: str, scheme: str) -> tuple[str, float,
                                                                                    dict]:
  """//tools:prune --ratio=0: the TensorFlow model to ONNX or LiteRT, quantized."""
  ext = "onnx" if runtime == "onnxruntime" else "tflite"
  out = os.path.join(work, f"r{ratio}_{scheme}.{ext}")
  args = [f"--in={pb}", f"--out={out}", f"--out_format={ext}", "--ratio=0"]
  if scheme != "float32":
    args += [f"--quantize={scheme}", "--min_agreement=0", *_CALIB]
    if scheme == "int8" and ext == "onnx":
      args.append(f"--quantize_calibration={_CALIBRATION.value}")
  seconds, doc = _prune(*args)
  return out, seconds, doc.get("quantization") or {}


def main(argv):
  del argv
  from graph_prune.bench import benchmark  # pylint: disable=g-import-not-at-top
  from graph_prune.bench import timing  # pylint: disable=g-import-not-at-top
  from graph_prune.data import preprocess  # pylint: disable=g-import-not-at-top
  from graph_prune.evaluate import evaluate  # pylint: disable=g-import-not-at-top
  work = _WORK.value or tempfile.mkdtemp(prefix="gp_quantize_")
  os.makedirs(work, exist_ok=True)
  scale = evaluate.Options(preprocess=preprocess.Preprocess(scale=1 / 255))
  batch_sizes = tuple(int(b) for b in _BATCH_SIZES.value)
  runs = [("onnxruntime", sch) for sch in _SCHEMES.value] + [
      ("litert", sch) for sch in _LITERT.value]
  # The float32 original in each runtime: every row's baseline.
  originals = {runtime: _convert(work, 0.0, _DEFAULT, runtime, "float32")
               for runtime in sorted({runtime for runtime, _ in runs})}
  rows = []
  print(f"{'ratio':>5} {'runtime':11} {'scheme':9} {'bytes':>10} {'smaller':>8} {'top-1':>7} "
        f"{'agree':>7} " + " ".join(f"{'speedup b' + str(b):>11}" for b in batch_sizes),
        flush=True)
  for ratio in (float(r) for r in _RATIOS.value):
    pb, prune_s, prune_doc = _pruned(work, ratio)
    if ratio > 0:
      print(f"ratio {ratio}: pruned, reconstructed and recovered in {prune_s:.0f} s", flush=True)
    for runtime, scheme in runs:
      path, seconds, q = (originals[runtime] if ratio == 0 and scheme == "float32" else
                          _convert(work, ratio, pb, runtime, scheme))
      top1 = evaluate.evaluate(evaluate.ModelSpec(path), "fashion-mnist:test", scale)["top1"]
      bench = benchmark.run(benchmark.Options(
          model=path, baseline=originals[runtime][0], batch_sizes=batch_sizes, memory=False,
          timing=timing.Settings(max_seconds=_MAX_SECONDS.value)))
      speedups = {str(b): bench["pairs"][str(b)]["speedup"]["median"] for b in batch_sizes}
      row = {"ratio": ratio, "runtime": runtime, "scheme": scheme, "bytes": os.path.getsize(path),
             "top1": top1, "holdout_agreement": (q.get("holdout") or {}).get("agreement"),
             "speedup": speedups, "convert_s": seconds, "quantization": q,
             "recovery": prune_doc.get("recovery"), "prune_s": prune_s,
             "device": bench["device_name"]}
      rows.append(row)
      base = os.path.getsize(originals[runtime][0])
      agree = row["holdout_agreement"]
      print(f"{ratio:5.2f} {runtime:11} {scheme:9} {row['bytes']:10,} {base / row['bytes']:7.2f}x "
            f"{top1:7.4f} {agree if agree is not None else float('nan'):7.4f} "
            + " ".join(f"{speedups[str(b)]:10.2f}x" for b in batch_sizes), flush=True)
  if rows:
    print(f"device: {rows[0]['device']}")
  if _JSON.value:
    with open(_JSON.value, "w", encoding="utf-8") as f:
      json.dump(rows, f, indent=2)
  if _PLOT.value:
    _plot(rows, batch_sizes, _PLOT.value)


def _plot(rows, batch_sizes, path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
  b = str(batch_sizes[-1])
  for runtime, ratio in sorted({(r["runtime"], r["ratio"]) for r in rows}):
    sel = [r for r in rows if r["ratio"] == ratio and r["runtime"] == runtime]
    marker = "o" if runtime == "onnxruntime" else "s"
    for ax, x in ((axes[0], [r["speedup"][b] for r in sel]),
                  (axes[1], [r["bytes"] / 1e6 for r in sel])):
      ax.plot(x, [100 * r["top1"] for r in sel], marker, label=f"{runtime}, ratio {ratio:g}")
      for xi, r in zip(x, sel):
        ax.annotate(r["scheme"], (xi, 100 * r["top1"]), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
  axes[0].set_xlabel(f"measured speedup vs the float32 original in the same runtime (CPU, "
                     f"batch {b})")
  axes[1].set_xlabel("file size (MB)")
  axes[1].set_xscale("log")
  for ax in axes:
    ax.set_ylabel("top-1 on Fashion-MNIST test (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


if __name__ == "__main__":
  app.run(main)
