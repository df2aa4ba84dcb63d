"""Recovery after pruning, on the frozen graph itself: distillation, fine-tuning, or
re-estimating the per-channel normalisation from calibration data.

TensorFlow only: the pruned graph's weight constants become variables
(adapters.tf_trainable), are trained or recalibrated, and go back into the
constants, so the result is written in the input's own format. Training runs under
the tf.distribute strategy the flag names, so one command serves a CPU, local GPUs
or a TPU. The modules: options (no TensorFlow), data, train, calibrate; this one
runs them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import numpy as np

from graph_prune import errors
from graph_prune.adapters import tf_model
from graph_prune.adapters import tf_trainable
from graph_prune.recover import calibrate
from graph_prune.recover import data as data_lib
from graph_prune.recover import gap
from graph_prune.recover import options as options_lib
from graph_prune.recover import train
from graph_prune.recover.options import Options

tf = tf_model.tf


def kept_logits(model: tf_model.TFModel, options: Options) -> str:
  output = options.output
  if output and output not in model.outputs:
    keys = dict(model.signature.outputs) if model.signature else {}
    if output not in keys:
      raise errors.UsageError(f"--recover_output '{output}' is not an output of the model "
                              f"({', '.join(model.outputs)})")
    output = keys[output]
  return tf_trainable.logits_tensor(model, output)


def agreement(teacher, student, x: np.ndarray, batch: int = 512) -> Optional[float]:
  """Fraction of samples on which both functions give the same top class."""
  if len(x) == 0:
    return None
  same = 0
  for i in range(0, len(x), batch):
    xb = tf.constant(x[i:i + batch])
    t, s = teacher(xb), student(xb)
    same += int(np.sum(np.argmax(t, axis=-1) == np.argmax(s, axis=-1)))
  return same / len(x)


def frozen_function(model: tf_model.TFModel, fetch: str):
  fn, _ = tf_model.concrete_function(model.graph_def, list(model.inputs), [fetch])
  return lambda x: fn(x)[0]


def recover(original: tf_model.TFModel, pruned: tf_model.TFModel,
            kept: Mapping[str, np.ndarray], options: Options,
            checkpoint_dir: Optional[str] = None) -> tuple[tf_model.TFModel, dict]:
  """The pruned model with recovered weights, and the recovery's report.

  `kept` maps a tensor name to the original channel positions it still carries
  (bn_recalibrate matches the original's statistics on those channels).
  """
  options_lib.check(options)
  if options.method == options_lib.GAP:
    raise errors.UsageError("--recover=gap trains before the slicing: run it through "
                            "pipeline.prune (Recovery.grow_and_prune)")
  logits = kept_logits(pruned, options)
  data = data_lib.load_data(pruned, options, labels=options.method == options_lib.FINETUNE)
  teacher = frozen_function(original, logits)
  before = agreement(teacher, frozen_function(pruned, logits), data.holdout)
  if options.method == options_lib.BN_RECALIBRATE:
    out, doc = calibrate.recalibrate(original, pruned, kept, data, options)
  else:
    out, doc = train.train(teacher, pruned, logits, data, options,
                           checkpoint_dir or options.checkpoint_dir)
  after = agreement(teacher, frozen_function(out, logits), data.holdout)
  doc.update(method=options.method, data=options.data, logits=logits,
             holdout_samples=len(data.holdout), holdout_agreement_before=before,
             holdout_agreement_after=after)
  return out, doc


@dataclasses.dataclass(frozen=True)
class Recovery:
  """The recovery step the pipeline runs after each pruning increment (it is
  handed in, so that the pipeline needs no TensorFlow training code)."""
  options: Options

  @property
  def checkpoint_dir(self) -> Optional[str]:
    return self.options.checkpoint_dir

  @property
  def grows(self) -> bool:
    """Grow-and-prune works before the slicing (grow_and_prune), not after it."""
    return self.options.method == options_lib.GAP

  def check(self) -> None:
    options_lib.check(self.options)

  @property
  def probe_steps(self) -> int:
    """Steps of the short recovery that scores a --mode=mixed candidate (probe); 0
    where there is none: bn_recalibrate takes no steps and gap trains before the
    slicing."""
    o = self.options
    if o.method not in (options_lib.DISTILL, options_lib.FINETUNE) or not o.train_steps:
      return 0
    return max(1, o.train_steps // 5) if o.probe_steps == -1 else o.probe_steps

  def probe(self, original: Any, pruned: Any) -> tuple[float, dict]:
    """A short recovery of a candidate (probe_steps, same data, schedule and seed, no
    checkpoints): its held-out agreement with the original after it, and its report.
    NetAdapt's short-term fine-tuning: a few steps rank the candidates by what
    recovery gives back, which what each loses before recovery need not."""
    short = dataclasses.replace(self.options, train_steps=self.probe_steps,
                                checkpoint_dir=None, tensorboard_dir=None)
    _, doc = recover(original, pruned, {}, short, None)
    return doc["holdout_agreement_after"], doc

  def __call__(self, original: Any, pruned: Any, kept: Mapping[str, np.ndarray],
               checkpoint_dir: Optional[str], step: int = 1) -> tuple[Any, dict]:
    """Recovery after increment `step` (1, ...) of --steps, with a seed of its own."""
    return recover(original, pruned, kept, self.options.reseeded(step - 1), checkpoint_dir)

  def grow_and_prune(self, original: Any, analysis, plan, replan: gap.Replan,
                     checkpoint_dir: Optional[str]) -> tuple[Any, Any, dict]:
    """The full-width model trained by grow-and-prune with the final plan's channels
    at zero, the final plan, and the report (agreement with the original on the
    held-out samples, for the pruned start and the end)."""
    options = self.options
    logits = kept_logits(original, options)
    data = data_lib.load_data(original, options, labels=False)
    teacher = frozen_function(original, logits)
    start = gap.masked(original, analysis, plan)
    before = agreement(teacher, frozen_function(start, logits), data.holdout)
    model, plan, doc = gap.grow_and_prune(original, analysis, plan, replan, teacher, logits,
                                          data, options, checkpoint_dir or options.checkpoint_dir)
    after = agreement(teacher, frozen_function(model, logits), data.holdout)
    doc.update(method=options.method, data=options.data, logits=logits,
               holdout_samples=len(data.holdout), holdout_agreement_before=before,
               holdout_agreement_after=after)
    return model, plan, doc
