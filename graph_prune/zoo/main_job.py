"""The main job: the built-in model pruned, its accuracy restored, evaluated and
benchmarked against the original, ending in one summary block.

Steps (each through the same code as the tools):
1. //tools:prune's pipeline: ratio 0.5 by activation on calibration samples,
   verified by the oracle, then reconstruction (lsq, no gradient steps) on 2,000
   unlabelled training images, then a short distillation;
2. //tools:evaluate's evaluation of the original and the pruned model on the
   10,000 Fashion-MNIST test images (with the agreement between them);
3. //tools:bench's A/B benchmark of the pruned model against the original (XLA
   on the best device present), batch 1 and 32.
The detailed reports go to the output directory next to the pruned model.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

from graph_prune import files

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_MODEL = os.path.join(_ROOT, "models", "default", "fmnist_vgg_bn.pb")


@dataclasses.dataclass(frozen=True)
class Settings:
  model: str = DEFAULT_MODEL
  out_dir: str = "out/default"
  ratio: float = 0.5
  criterion: str = "activation"
  calibration_samples: int = 2000
  distill_steps: int = 600
  batch_sizes: tuple[int, ...] = (1, 32)
  bench_seconds: float = 3.0     # timing budget per model and batch size
  data_dir: str = ""             # Fashion-MNIST IDX files (default: the Debian package's)


def run(settings: Settings) -> dict[str, Any]:
  """Runs the job; returns the summary (also written to out_dir/summary.json)."""
  # Imported here: the command's flag errors do not pay for TensorFlow.
  from graph_prune import pipeline  # pylint: disable=g-import-not-at-top
  from graph_prune.bench import benchmark  # pylint: disable=g-import-not-at-top
  from graph_prune.bench import timing  # pylint: disable=g-import-not-at-top
  from graph_prune.calibration import samples  # pylint: disable=g-import-not-at-top
  from graph_prune.data import idx  # pylint: disable=g-import-not-at-top
  from graph_prune.data import preprocess  # pylint: disable=g-import-not-at-top
  from graph_prune.evaluate import evaluate  # pylint: disable=g-import-not-at-top
  from graph_prune.reconstruct import reconstruct  # pylint: disable=g-import-not-at-top
  from graph_prune.recover import options as recover_options  # pylint: disable=g-import-not-at-top
  from graph_prune.recover import recover  # pylint: disable=g-import-not-at-top

  start = time.perf_counter()
  data_dir = settings.data_dir or idx.FASHION_MNIST_DIR
  os.makedirs(settings.out_dir, exist_ok=True)
  out = os.path.join(settings.out_dir, "fmnist_vgg_bn_pruned.pb")
  scale = preprocess.Preprocess(scale=1 / 255)
  recovery = None
  if settings.distill_steps:
    recovery = recover.Recovery(recover_options.Options(
        method=recover_options.DISTILL, data="fashion-mnist:train", data_dir=data_dir,
        preprocess=scale, train_steps=settings.distill_steps, batch_size=64,
        learning_rate=1e-3, holdout_samples=500, log_every=max(settings.distill_steps, 1)))
  doc = pipeline.prune(settings.model, out, pipeline.Options(
      ratio=settings.ratio, criterion=settings.criterion, overwrite=True,
      plan_out=os.path.join(settings.out_dir, "plan.json"),
      report=os.path.join(settings.out_dir, "report.json"),
      reconstruct=reconstruct.Options("lsq"),
      calibration=samples.Spec("fashion-mnist:train", data_dir=data_dir, preprocess=scale,
                               samples=settings.calibration_samples, holdout=500),
      recover=recovery))
  prune_s = time.perf_counter() - start

  t0 = time.perf_counter()
  eval_options = evaluate.Options(preprocess=scale, data_dir=data_dir)
  original = evaluate.evaluate(evaluate.ModelSpec(settings.model), "fashion-mnist:test",
                               eval_options)
  pruned = evaluate.evaluate(evaluate.ModelSpec(out), "fashion-mnist:test", dataclasses.replace(
      eval_options, reference=evaluate.ModelSpec(settings.model)))
  eval_s = time.perf_counter() - t0

  t0 = time.perf_counter()
  bench = benchmark.run(benchmark.Options(
      model=out, baseline=settings.model, batch_sizes=settings.batch_sizes, memory=False,
      timing=timing.Settings(warmup=2, min_runs=5, max_seconds=settings.bench_seconds),
      report=os.path.join(settings.out_dir, "bench.json"), overwrite=True))
  bench_s = time.perf_counter() - t0

  r, v = doc.get("reconstruction") or {}, doc["verify"] or {}
  rec = doc.get("recovery") or {}
  summary = {
      "model": settings.model, "pruned": out, "ratio": settings.ratio,
      "criterion": settings.criterion,
      "params": [doc["params_before"], doc["params_after"]],
      "flops": [doc["flops_before"], doc["flops_after"]],
      "file_bytes": [os.path.getsize(settings.model), os.path.getsize(out)],
      "top1": [original["top1"], pruned["top1"]],
      "agreement_top1": pruned["agreement"]["top1"],
      "test_samples": pruned["samples"],
      "verify_max_rel_diff": v.get("max_rel_diff"),
      "reconstruction": {"method": r.get("method"), "samples": r.get("samples"),
                         "seconds": r.get("seconds")},
      "distillation": ({"steps": rec.get("train_steps"), "seconds": rec.get("train_s")}
                       if rec else None),
      "device": bench["device"], "runtime": bench["models"]["candidate"]["runtime"],
      "latency_ms": {str(b): [bench["models"]["baseline"]["batches"][str(b)]["latency_ms"]
                              ["median"],
                              bench["models"]["candidate"]["batches"][str(b)]["latency_ms"]
                              ["median"]] for b in settings.batch_sizes},
      "speedup": {str(b): bench["pairs"][str(b)]["speedup"]["median"]
                  for b in settings.batch_sizes},
      "seconds": {"prune_restore_verify": round(prune_s, 1), "evaluate": round(eval_s, 1),
                  "benchmark": round(bench_s, 1),
                  "total": round(time.perf_counter() - start, 1)},
      "out_dir": settings.out_dir,
  }
  files.write_json(os.path.join(settings.out_dir, "summary.json"), summary, indent=2)
  return summary


def _pct(before: float, after: float) -> str:
  return f"{100.0 * (after - before) / before:+.1f} %" if before else ""


def text(s: dict[str, Any]) -> str:
  """The summary block."""
  p, f, b, t = s["params"], s["flops"], s["file_bytes"], s["top1"]
  rows = [("", "original", "pruned", ""),
          ("parameters", f"{p[0]:,}", f"{p[1]:,}", _pct(*p)),
          ("FLOPs / image", f"{f[0] / 1e6:.1f} M", f"{f[1] / 1e6:.1f} M", _pct(*f)),
          ("file size", f"{b[0] / 1e6:.2f} MB", f"{b[1] / 1e6:.2f} MB", _pct(*b)),
          ("test top-1", f"{t[0]:.2%}", f"{t[1]:.2%}",
           f"{100 * (t[1] - t[0]):+.2f} points")]
  for batch, (a, c) in s["latency_ms"].items():
    rows.append((f"latency, batch {batch}", f"{a:.2f} ms", f"{c:.2f} ms",
                 f"{s['speedup'][batch]:.2f}x faster"))
  width = [max(len(r[i]) for r in rows) for i in range(4)]
  lines = ["", "=" * 72,
           f"graph_prune main job: {os.path.basename(s['model'])}, {s['ratio']:.0%} of the "
           f"channels of every group removed ({s['criterion']})", ""]
  lines += [f"  {r[0]:<{width[0]}}  {r[1]:>{width[1]}}  {r[2]:>{width[2]}}  {r[3]}"
            for r in rows]
  rec, dist = s["reconstruction"], s["distillation"]
  restored = f"lsq reconstruction on {rec['samples']:,} unlabelled training images " \
             f"({rec['seconds']:.0f} s)"
  if dist:
    restored += f" + {dist['steps']} distillation steps ({dist['seconds']:.0f} s)"
  sec = s["seconds"]
  lines += ["",
            f"  accuracy: {s['test_samples']:,} Fashion-MNIST test images; the pruned model "
            f"agrees with the original on {s['agreement_top1']:.1%} of them",
            f"  restored by: {restored}",
            f"  speed: {s['runtime']} on {s['device']}, original and pruned timed in "
            "alternation",
            f"  verified: the slicing is exact: with the removed channels zeroed, the original "
            f"computes what the pruned model computed before accuracy was restored (max rel "
            f"diff {s['verify_max_rel_diff']:.1e})",
            f"  time: {sec['total']:.0f} s (prune, restore and verify "
            f"{sec['prune_restore_verify']:.0f} s, evaluate {sec['evaluate']:.0f} s, benchmark "
            f"{sec['benchmark']:.0f} s)",
            f"  details: {s['out_dir']}/ (pruned model, report.json, plan.json, bench.json, "
            "summary.json)",
            "=" * 72]
  return "\n".join(lines)
