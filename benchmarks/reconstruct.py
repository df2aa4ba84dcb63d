"""Accuracy given back without a training loop: the built-in model pruned by
//tools:prune with and without reconstruction, on its frozen GraphDef and on its
tf2onnx conversion; the whole command's wall time (file to file, in a child
process) and the pruned model's top-1 on the 10,000 Fashion-MNIST test images.

  bazel run //benchmarks:reconstruct -- [--ratio=0.5] [--samples=2000] [--json=out.json]

Calibration samples are the first --samples Fashion-MNIST training images (no
labels read), plus 500 more held out. Rows: method x criterion x format.
"""

import json
import os
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags

_RATIO = flags.DEFINE_float("ratio", 0.5, "Pruning ratio.")
_SAMPLES = flags.DEFINE_integer("samples", 2000, "Calibration samples.")
_RUNS = flags.DEFINE_list("runs", ["none:l1", "bias:l1", "lsq:l1", "lsq:activation"],
                          "METHOD:CRITERION pairs (METHOD none: no reconstruction).")
_FORMATS = flags.DEFINE_list("formats", ["pb", "onnx"], "pb (frozen GraphDef), onnx.")
_JSON = flags.DEFINE_string("json", None, "Also write the rows as JSON here.")

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_DEFAULT = os.path.join(_ROOT, "models", "default", "fmnist_vgg_bn.pb")


def _prune(src: str, out: str, method: str, criterion: str, report: str) -> float:
  args = [sys.executable, os.path.join(_ROOT, "tools", "prune.py"), f"--in={src}",
          f"--out={out}", f"--ratio={_RATIO.value}", f"--criterion={criterion}",
          f"--report={report}", "--overwrite"]
  if method != "none" or criterion in ("activation", "apoz", "wanda"):
    args += ["--calibration_data=fashion-mnist:train", f"--calibration_samples={_SAMPLES.value}",
             "--calibration_holdout=500", "--scale=1/255"]
  if method != "none":
    args.append(f"--reconstruct={method}")
  env = dict(os.environ, PYTHONPATH=_ROOT, TF_CPP_MIN_LOG_LEVEL="3")
  t0 = time.perf_counter()
  res = subprocess.run(args, capture_output=True, text=True, env=env, check=False)
  seconds = time.perf_counter() - t0
  if res.returncode:
    raise SystemExit(f"prune failed: {res.stderr.strip().splitlines()[-1]}")
  return seconds


def main(argv):
  del argv
  from graph_prune import formats  # pylint: disable=g-import-not-at-top
  from graph_prune.adapters import tf_to_onnx  # pylint: disable=g-import-not-at-top
  from graph_prune.data import preprocess  # pylint: disable=g-import-not-at-top
  from graph_prune.evaluate import evaluate  # pylint: disable=g-import-not-at-top
  work = tempfile.mkdtemp(prefix="gp_reconstruct_")
  sources = {"pb": _DEFAULT}
  if "onnx" in _FORMATS.value:
    sources["onnx"] = os.path.join(work, "default.onnx")
    exported = tf_to_onnx.export(formats.ModelRef(_DEFAULT).load(), 17)
    formats.for_name(formats.ONNX).adapter.write(exported, sources["onnx"])
  scale = evaluate.Options(preprocess=preprocess.Preprocess(scale=1 / 255))
  unpruned = evaluate.evaluate(evaluate.ModelSpec(_DEFAULT), "fashion-mnist:test", scale)["top1"]
  print(f"unpruned top-1 {unpruned:.4f}; ratio {_RATIO.value}, {_SAMPLES.value} calibration "
        "samples", flush=True)
  print(f"{'format':6} {'method':6} {'criterion':10} {'top-1':>7} {'drop':>7} "
        f"{'agree':>7} {'command s':>10} {'reconstruct s':>14}")
  rows = []
  for fmt in _FORMATS.value:
    for run in _RUNS.value:
      method, criterion = run.split(":")
      out = os.path.join(work, f"{method}_{criterion}.{fmt}")
      report = out + ".json"
      seconds = _prune(sources[fmt], out, method, criterion, report)
      with open(report, encoding="utf-8") as f:
        doc = json.load(f)
      top1 = evaluate.evaluate(evaluate.ModelSpec(out), "fashion-mnist:test", scale)["top1"]
      r = doc.get("reconstruction") or {}
      agree = (r.get("holdout_after") or {}).get("agreement")
      row = {"format": fmt, "method": method, "criterion": criterion, "ratio": _RATIO.value,
             "samples": _SAMPLES.value, "top1": top1, "top1_unpruned": unpruned,
             "holdout_agreement": agree, "command_s": seconds,
             "reconstruct_s": doc["timings_s"].get("reconstruct_s")}
      rows.append(row)
      print(f"{fmt:6} {method:6} {criterion:10} {top1:7.4f} {unpruned - top1:7.4f} "
            f"{agree if agree is not None else float('nan'):7.4f} {seconds:10.1f} "
            f"{row['reconstruct_s'] or 0:14.1f}", flush=True)
  if _JSON.value:
    with open(_JSON.value, "w", encoding="utf-8") as f:
      json.dump(rows, f, indent=2)


if __name__ == "__main__":
  app.run(main)
