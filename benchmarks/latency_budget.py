"""Latency budgets, measured: //tools:prune --target_speedup=X with uniform and
latency-aware allocation, each written model then timed again by //tools:bench
against the original (a separate A/B run, not the command's own measurement),
with its FLOPs ratio and efficiency (measured speedup over the FLOPs ratio), the
whole command's wall time and, for latency allocation, the per-layer profile
(points timed and from the cache, seconds) and the predicted speedup.

  bazel run //benchmarks:latency_budget -- [--models=default,resnet,/path/ResNet50_224.pb]
      [--batch_sizes=1,32] [--targets=1.5,2,3] [--allocations=uniform,latency]
      [--calibration_data=x.npz] [--recover_steps=3000] [--json=rows.json]

A model is `default` or `resnet` (the built-in models) or the path of a frozen GraphDef or
ONNX file (e.g. the Keras applications //benchmarks:whole_command freezes).
Besides the filter allocations, `layer` is --mode=layer, and `mixed` and
`mixed_latency` are --mode=mixed with uniform or latency-aware filters (its
candidate chosen by the output error on --calibration_data: Fashion-MNIST's
training images for the built-in models). Target met: the re-measured speedup
within +-7 % of the target. With
--recover_steps (the built-in model), each row's plan is applied again with lsq
reconstruction and that many distillation steps, and the recovered model's top-1
on the 10,000 test images is given: accuracy at equal measured speedup.
"""

import json
import os
import tempfile

from absl import app
from absl import flags

from benchmarks import tool_runs

_MODELS = flags.DEFINE_list("models", ["default"], "default, resnet (the built-in models), "
                            "or model paths.")
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["1", "32"], "Batch sizes (one run each).")
_TARGETS = flags.DEFINE_list("targets", ["1.5", "2", "3"], "Target speedups.")
_ALLOCATIONS = flags.DEFINE_list("allocations", ["uniform", "latency"], "Allocations "
                                 "(uniform, global, latency), layer (--mode=layer), mixed, "
                                 "mixed_latency (--mode=mixed with that allocation).")
_CALIBRATION_DATA = flags.DEFINE_string(
    "calibration_data", None, "What --mode=mixed measures its candidates on, for models "
    "other than the built-in one (an .npz with x; 256 samples fitted, 64 held out).")
_MAX_SECONDS = flags.DEFINE_float("max_seconds", 3.0, "Timing budget per candidate.")
_CACHE = flags.DEFINE_string("widths_cache", None, "Per-layer latency cache (default: a "
                             "fresh one in the work directory, so the first profile is timed).")
_RECOVER_STEPS = flags.DEFINE_integer(
    "recover_steps", 0, "The built-in model: also prune by each row's plan with lsq "
    "reconstruction and this many distillation steps, and give test top-1 (0: no).")
_JSON = flags.DEFINE_string("json", None, "Write the rows as JSON here.")


def _calibration(model: str) -> list[str]:
  if model in tool_runs.BUILT_IN:
    return [*tool_runs.FASHION_MNIST_CALIBRATION, "--scale=1/255"]
  if _CALIBRATION_DATA.value:
    return [f"--calibration_data={_CALIBRATION_DATA.value}", "--calibration_samples=256",
            "--calibration_holdout=64"]
  return []


def _recovered(src: str, doc: dict, out: str) -> dict:
  """The report's widths pruned again (each pruned group at its own ratio, the
  same criterion, so the same channels), with lsq reconstruction and
  distillation; test top-1."""
  ratios = [f"--layer_ratio={g['sources'][0]}="
            f"{(g['channels_before'] - g['channels_after']) / g['channels_before']!r}"
            for g in doc["groups"]]
  seconds, res = tool_runs.run(
      "prune", f"--in={src}", f"--out={out}", "--ratio=0", *ratios,
      f"--criterion={doc['criterion']}", "--calibration_data=fashion-mnist:train",
      "--calibration_samples=2000", "--calibration_holdout=500", "--scale=1/255",
      "--reconstruct=lsq", "--recover=distill", "--recover_data=fashion-mnist:train",
      f"--recover_train_steps={_RECOVER_STEPS.value}", "--learning_rate=2e-3", "--overwrite")
  if res.returncode:
    return {"recover_error": tool_runs.last_line(res)}
  _, ev = tool_runs.run("evaluate", f"--model={out}", "--data=fashion-mnist:test",
                        "--scale=1/255", f"--report={out}.eval.json")
  if ev.returncode:
    return {"recover_error": tool_runs.last_line(ev)}
  with open(f"{out}.eval.json", encoding="utf-8") as f:
    top1 = json.load(f)["top1"]
  return {"top1_recovered": top1, "recover_command_s": round(seconds, 1),
          "recover_steps": _RECOVER_STEPS.value}


def main(argv):
  del argv
  work = tempfile.mkdtemp(prefix="gp_latency_budget_")
  cache = _CACHE.value or os.path.join(work, "widths.json")
  rows = []
  print(f"{'model':<22} {'b':>3} {'method':<13} {'target':>6} {'in-cmd':>7} {'again':>7} "
        f"{'miss':>6} {'FLOPs':>6} {'eff':>5} {'pred':>6} {'cmd s':>6} {'prof s':>6}")
  for model in _MODELS.value:
    src, name = tool_runs.model_source(model)
    ext = os.path.splitext(src)[1]
    for batch in _BATCH_SIZES.value:
      for target in _TARGETS.value:
        for how in _ALLOCATIONS.value:
          out = os.path.join(work, f"{name}_b{batch}_{target}_{how}{ext}")
          report = out + ".json"
          method = tool_runs.method_flags(how, _calibration(model))
          seconds, res = tool_runs.run(
              "prune", f"--in={src}", f"--out={out}", f"--target_speedup={target}", *method,
              f"--batch_sizes={batch}", "--device=cpu", f"--max_seconds={_MAX_SECONDS.value}",
              f"--widths_cache={cache}", f"--report={report}", "--overwrite")
          row = {"model": name, "batch": int(batch), "allocation": how, "target": float(target),
                 "command_s": round(seconds, 1)}
          if res.returncode:
            row["error"] = tool_runs.last_line(res)
            rows.append(row)
            print(f"{name:<22} {batch:>3} {how:<13} {target:>6} failed: {row['error']}")
            continue
          with open(report, encoding="utf-8") as f:
            doc = json.load(f)
          budget = doc["budget"]
          bench_report = out + ".bench.json"
          _, b = tool_runs.run(
              "bench", f"--baseline={src}", f"--model={out}", f"--batch_sizes={batch}",
              "--device=cpu", f"--max_seconds={max(_MAX_SECONDS.value, 5.0)}", "--memory=false",
              f"--report={bench_report}", "--overwrite")
          again = None
          if b.returncode == 0:
            with open(bench_report, encoding="utf-8") as f:
              bench = json.load(f)
            again = round(bench["pairs"][str(batch)]["speedup"]["median"], 4)
          flops_ratio = doc["flops_before"] / max(doc["flops_after"], 1)
          prof = budget.get("latency_profile", {})
          row.update(in_command=budget.get("measured_speedup"), again=again,
                     miss=None if again is None else round(again / float(target) - 1, 4),
                     flops_ratio=round(flops_ratio, 4),
                     efficiency=None if again is None else round(again / flops_ratio, 4),
                     predicted=budget.get("predicted_speedup"),
                     refinements=len(budget.get("refinements", [])) or None,
                     candidates_timed=budget.get("candidates_timed"),
                     groups_restored=budget.get("groups_restored"),
                     profile_s=prof.get("seconds"), points_timed=prof.get("points_timed"),
                     points_cached=prof.get("points_cached"),
                     widths={g["sources"][0]: [g["channels_before"], g["channels_after"]]
                             for g in doc["groups"]})
          if _RECOVER_STEPS.value and model == "default" and how in ("uniform", "global",
                                                                      "latency"):
            row.update(_recovered(src, doc, out + ".recovered.pb"))
          rows.append(row)
          fmt = lambda v, f: "-" if v is None else format(v, f)
          print(f"{name:<22} {batch:>3} {how:<13} {target:>6} {fmt(row['in_command'], '.3f'):>7} "
                f"{fmt(again, '.3f'):>7} {fmt(row['miss'], '+.1%'):>6} {flops_ratio:>6.2f} "
                f"{fmt(row['efficiency'], '.2f'):>5} {fmt(row['predicted'], '.2f'):>6} "
                f"{seconds:>6.1f} {fmt(row['profile_s'], '.1f'):>6}"
                + (f"  top-1 {row['top1_recovered']:.4f}" if "top1_recovered" in row else ""),
                flush=True)
  if _JSON.value:
    with open(_JSON.value, "w", encoding="utf-8") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  app.run(main)
