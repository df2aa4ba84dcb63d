"""Pruning methods compared at equal measured speed, with the same recovery: on the
built-in models, //tools:prune --target_speedup=X with uniform, global and
latency-aware filter allocation, layer removal (--mode=layer) and mixed
(--mode=mixed, its filters allocated uniformly or, mixed_latency, by the latency
model), each followed by the same distillation (unlabelled Fashion-MNIST
training images, the same steps and learning rate), then top-1 on the 10,000 test
images, the speedup measured in the command (XLA, this CPU, one batch size), the
FLOPs and parameters kept. LayerPrune's claim (removing layers reaches a larger
measured speedup than filters at similar accuracy) is checked by these rows.

  bazel run //benchmarks:prune_methods -- [--models=default,resnet] [--targets=1.5,2,3]
      [--methods=uniform,global,latency,layer,mixed,mixed_latency] [--batch_sizes=32]
      [--criterion=l1] [--recover_steps=1000] [--repeats=1] [--csv=rows.csv]
      [--png=plot.png]

With --repeats=N every command runs N times (the speed each measures, and so the
widths a budget chooses, vary from run to run on a small CPU), and a summary gives
each method's mean and range of top-1 and measured speedup over its runs.

A run the tool refuses (a target that a method cannot reach) is a row with its
one-line error.
"""

import csv
import json
import os
import tempfile

from absl import app
from absl import flags

from benchmarks import tool_runs

_MODELS = flags.DEFINE_list("models", ["default", "resnet"], "Built-in models: default "
                            "(VGG-style), resnet (models/resnet), or model paths.")
_TARGETS = flags.DEFINE_list("targets", ["1.5", "2", "3"], "Target speedups.")
_METHODS = flags.DEFINE_list("methods", ["uniform", "global", "latency", "layer", "mixed",
                                         "mixed_latency"],
                             "Methods: uniform, global, latency (filter allocations), layer, "
                             "mixed, mixed_latency (--mode=mixed, its filters allocated "
                             "uniformly or by the latency model).")
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["32"], "Batch sizes the speed is measured at.")
_CRITERION = flags.DEFINE_string("criterion", "l1", "//tools:prune's --criterion, every run "
                                 "(a calibrated one on the Fashion-MNIST calibration images).")
_RECOVER_STEPS = flags.DEFINE_integer("recover_steps", 1000, "Distillation steps, every run.")
_MAX_SECONDS = flags.DEFINE_float("max_seconds", 2.0, "Timing budget per candidate.")
_REPEATS = flags.DEFINE_integer("repeats", 1, "Runs of every command (rows `run` 0..N-1).",
                                lower_bound=1)
_CSV = flags.DEFINE_string("csv", None, "Write the rows here.")
_PNG = flags.DEFINE_string("png", None, "Plot accuracy against measured speedup here.")

COLUMNS = ("model", "method", "target", "batch", "run", "top1", "measured_speedup", "flops_kept",
           "params_kept", "removed", "command_s", "error")


def _top1(path: str, report: str) -> float:
  _, ev = tool_runs.run("evaluate", f"--model={path}", "--data=fashion-mnist:test",
                        "--scale=1/255", f"--report={report}")
  if ev.returncode:
    raise RuntimeError(tool_runs.last_line(ev))
  with open(report, encoding="utf-8") as f:
    return json.load(f)["top1"]


def run_one(src: str, name: str, method: str, target: str, batch: str, work: str,
            cache: str, run: int = 0) -> dict:
  out = os.path.join(work, f"{name}_{method}_{target}_b{batch}_r{run}.pb")
  report = out + ".json"
  seconds, res = tool_runs.run(
      "prune", f"--in={src}", f"--out={out}", f"--target_speedup={target}",
      *tool_runs.method_flags(method, tool_runs.FASHION_MNIST_CALIBRATION, _CRITERION.value),
      f"--batch_sizes={batch}", "--device=cpu", f"--max_seconds={_MAX_SECONDS.value}",
      f"--widths_cache={cache}",
      "--recover=distill", "--recover_data=fashion-mnist:train",
      f"--recover_train_steps={_RECOVER_STEPS.value}", "--learning_rate=2e-3", "--scale=1/255",
      f"--report={report}", "--overwrite")
  row = {"model": name, "method": method, "target": float(target), "batch": int(batch),
         "run": run, "command_s": round(seconds, 1)}
  if res.returncode:
    row["error"] = tool_runs.last_line(res)
    return row
  with open(report, encoding="utf-8") as f:
    doc = json.load(f)
  lay = doc.get("layers") or {}
  removed = []
  if lay:
    removed.append(f"{lay['removed']} of {lay['removable']} layers/blocks")
  if doc["groups_pruned"]:
    removed.append(f"{doc['groups_pruned']} groups cut")
  row.update(top1=_top1(out, out + ".eval.json"),
             measured_speedup=doc["budget"].get("measured_speedup"),
             flops_kept=round(doc["flops_after"] / doc["flops_before"], 4),
             params_kept=round(doc["params_after"] / doc["params_before"], 4),
             removed="; ".join(removed))
  return row


def _plot(rows: list[dict], baselines: dict, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot  # pylint: disable=g-import-not-at-top
  models = list(dict.fromkeys(r["model"] for r in rows))
  fig, axes = pyplot.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
  for ax, model in zip(axes[0], models):
    for method in dict.fromkeys(r["method"] for r in rows):
      pts = sorted((r["measured_speedup"], r["top1"]) for r in rows
                   if r["model"] == model and r["method"] == method and r.get("top1") is not None)
      if pts:
        ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], "o-", label=method)
    if model in baselines:
      ax.axhline(100 * baselines[model], color="gray", ls="--", lw=1, label="unpruned")
    ax.set_title(f"{model} (distilled {_RECOVER_STEPS.value} steps)")
    ax.set_xlabel("measured speedup (XLA CPU)")
    ax.set_ylabel("test top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)


def _summary(rows: list[dict]) -> None:
  """Per model, batch, target and method: the runs that met the target, mean and
  range of their top-1 and measured speedup."""
  print(f"\n{'model':<10} {'method':<13} {'target':>6} {'b':>3} {'met':>5} {'top-1 mean':>10} "
        f"{'(min-max)':>15} {'speedup mean':>12} {'(min-max)':>13}")
  for key in dict.fromkeys((r["model"], r["batch"], r["target"], r["method"]) for r in rows):
    runs = [r for r in rows if (r["model"], r["batch"], r["target"], r["method"]) == key]
    ok = [r for r in runs if "error" not in r]
    name, batch, target, method = key
    line = f"{name:<10} {method:<13} {target:>6} {batch:>3} {len(ok):>2}/{len(runs):<2}"
    if ok:
      top1 = [100 * r["top1"] for r in ok]
      speed = [r["measured_speedup"] for r in ok]
      line += (f" {sum(top1) / len(ok):>9.2f}% ({min(top1):.2f}-{max(top1):.2f}%) "
               f"{sum(speed) / len(ok):>11.3f}x ({min(speed):.2f}-{max(speed):.2f}x)")
    print(line, flush=True)


def main(argv):
  del argv
  work = tempfile.mkdtemp(prefix="gp_methods_")
  cache = os.path.join(work, "widths.json")
  rows, baselines = [], {}
  print(f"{'model':<10} {'method':<13} {'target':>6} {'b':>3} {'top-1':>7} {'speedup':>8} "
        f"{'FLOPs':>6} {'params':>7} {'cmd s':>6}")
  for model in _MODELS.value:
    src, name = tool_runs.model_source(model)
    baselines[name] = _top1(src, os.path.join(work, f"{name}.eval.json"))
    print(f"{name:<10} unpruned top-1 {baselines[name]:.4f}", flush=True)
    for batch in _BATCH_SIZES.value:
      for target in _TARGETS.value:
        for run in range(_REPEATS.value):
          for method in _METHODS.value:
            row = run_one(src, name, method, target, batch, work, cache, run)
            rows.append(row)
            if "error" in row:
              print(f"{name:<10} {method:<13} {target:>6} {batch:>3} refused: {row['error']}",
                    flush=True)
              continue
            print(f"{name:<10} {method:<13} {target:>6} {batch:>3} {row['top1']:>7.4f} "
                  f"{row['measured_speedup']:>8.3f} {row['flops_kept']:>6.3f} "
                  f"{row['params_kept']:>7.3f} {row['command_s']:>6.1f}  {row['removed']}",
                  flush=True)
  if _REPEATS.value > 1:
    _summary(rows)
  for name, top1 in baselines.items():
    rows.append({"model": name, "method": "unpruned", "target": 1.0, "top1": top1,
                 "measured_speedup": 1.0, "flops_kept": 1.0, "params_kept": 1.0})
  if _CSV.value:
    with open(_CSV.value, "w", newline="", encoding="utf-8") as f:
      writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
      writer.writeheader()
      writer.writerows(rows)
  if _PNG.value:
    _plot([r for r in rows if r["method"] != "unpruned"], baselines, _PNG.value)


if __name__ == "__main__":
  app.run(main)
