"""The sweep's recovery step: each pruned run pruned again with recovery, and its
accuracy measured after it (columns *_recovered).

Recovery changes weight values, never shapes, so the run's benchmark figures hold
for the recovered model; the step checks that the parameter count is the same.
Checkpoints go to <out_dir>/checkpoints/<key>, so a sweep killed during a long
recovery resumes that recovery where its last checkpoint was.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from typing import Any, Mapping

from graph_prune import errors
from graph_prune import pipeline
from graph_prune.sweep import sweep

COLUMNS = ("recover_method", "recover_train_steps", "top1_recovered", "top5_recovered",
           "top1_recovered_drop", "agreement_recovered", "holdout_agreement_before",
           "holdout_agreement_after", "recover_s")


@dataclasses.dataclass(frozen=True)
class RecoveryStep:
  options: Any  # graph_prune.recover.options.Options
  columns: tuple[str, ...] = COLUMNS

  @property
  def name(self) -> str:
    """Part of the sweep's definition: another recovery is another sweep."""
    o = self.options
    return (f"recover({o.method}, steps={o.train_steps}, batch={o.batch_size}, "
            f"lr={o.learning_rate:g}, T={o.temperature:g}, distill_weight={o.distill_weight:g}, "
            f"calibration={o.calibration_samples}, holdout={o.holdout_samples}, "
            f"data={o.data}, split={o.split}, preprocess={o.preprocess.to_json()}, "
            f"strategy={o.strategy}" + (f", parts={o.gap_parts}, phase_steps={o.gap_phase_steps}"
                                        if o.method == "gap" else "")
            + (f", augment={o.augment.to_json()}" if o.augment.on else "")
            + (", batch_stats" if o.batch_stats else "")
            + (f", dropout={o.dropout:g}" if o.dropout else "") + ")")

  def __call__(self, ctx: sweep.RunContext) -> Mapping[str, Any]:
    config, run = ctx.config, ctx.run
    if not config.data:
      raise errors.UsageError("recovery in a sweep needs --data to measure accuracy after it")
    root, ext = os.path.splitext(ctx.pruned)
    out = f"{root}_recovered{ext}"
    ckpt = os.path.join(config.out_dir, "checkpoints", run.key)
    from graph_prune.recover import recover as recover_lib  # pylint: disable=g-import-not-at-top
    t0 = time.perf_counter()
    doc = pipeline.prune(config.model, out, pipeline.Options(
        ratio=run.ratio, criterion=run.criterion, round_to=ctx.row["round_to_used"],
        seed=config.seed, tolerance=config.tolerance, signature=config.signature,
        inputs=tuple(config.inputs), outputs=tuple(config.outputs), overwrite=True,
        reconstruct=config.reconstruct, calibration=config.calibration, taylor=config.taylor,
        recover=recover_lib.Recovery(dataclasses.replace(self.options, checkpoint_dir=ckpt))))
    recover_s = time.perf_counter() - t0
    try:
      if doc["params_after"] != ctx.row["params_pruned"]:
        raise errors.VerificationError(
            f"the recovered model has {doc['params_after']} parameters, the pruned one "
            f"{ctx.row['params_pruned']}; the plan was not reproduced")
      e = sweep.evaluate_model(config, out, config.model)
    finally:
      if not config.keep_models and os.path.exists(out):
        shutil.rmtree(out) if os.path.isdir(out) else os.remove(out)
    shutil.rmtree(ckpt, ignore_errors=True)  # the run's row lands next: nothing to resume
    rec = doc["recovery"]
    top1_orig = ctx.baseline["accuracy"]["top1"]
    return {"recover_method": rec["method"], "recover_train_steps": rec.get("train_steps"),
            "top1_recovered": e["top1"], "top5_recovered": e["top5"],
            "top1_recovered_drop": top1_orig - e["top1"],
            "agreement_recovered": e["agreement"]["top1"],
            "holdout_agreement_before": rec["holdout_agreement_before"],
            "holdout_agreement_after": rec["holdout_agreement_after"], "recover_s": recover_s}
