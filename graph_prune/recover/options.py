"""Recovery options and their checks, without TensorFlow: the pipeline and the
command-line tools validate flags before any framework is imported."""

from __future__ import annotations

import dataclasses
from typing import Optional

from graph_prune import errors
from graph_prune.data import preprocess as preprocess_lib
from graph_prune.recover import augment as augment_lib

DISTILL, FINETUNE, BN_RECALIBRATE, GAP = "distill", "finetune", "bn_recalibrate", "gap"
METHODS = (DISTILL, FINETUNE, BN_RECALIBRATE, GAP)
STRATEGIES = ("default", "mirrored", "tpu")


@dataclasses.dataclass(frozen=True)
class Options:
  method: str = DISTILL
  data: str = ""                   # data spec (graph_prune.data.sources)
  data_format: str = "auto"
  data_dir: Optional[str] = None   # Fashion-MNIST directory for 'fashion-mnist:SPLIT'
  split: str = "train"             # IDX split of a directory
  preprocess: preprocess_lib.Preprocess = preprocess_lib.Preprocess()
  batch_size: int = 64             # global batch, split over the strategy's replicas
  train_steps: int = 1000          # gradient steps per recovery (per increment with --steps)
  learning_rate: float = 1e-3      # peak; linear warm-up then cosine decay
  temperature: float = 4.0         # distillation temperature
  distill_weight: float = 0.0      # finetune: weight of the distillation term in the loss
  calibration_samples: int = 2048  # bn_recalibrate's and batch_stats' statistics
  holdout_samples: int = 2000      # kept out of training; agreement measured on them
  strategy: str = "default"
  checkpoint_dir: Optional[str] = None
  checkpoint_every: int = 200
  log_every: int = 100
  seed: int = 0
  output: Optional[str] = None     # the class-score output (default: the first output)
  tensorboard_dir: Optional[str] = None   # TensorBoard scalars of the training
  gap_parts: int = 4               # gap: the prunable groups are cut into this many parts
  gap_phase_steps: int = 250       # gap: distillation steps per phase (one part grown)
  augment: augment_lib.Augment = augment_lib.Augment()  # training batches (recover.augment)
  batch_stats: bool = False        # train with batch statistics at folded batch norms
  dropout: float = 0.0             # dropout rate at the classifier's input in training
  # --mode=mixed: steps of the short recovery that scores each candidate (held-out
  # agreement with the original after it); -1: a fifth of train_steps; 0: none (the
  # candidates are scored by the outputs they lose, before recovery).
  probe_steps: int = -1

  def reseeded(self, k: int) -> "Options":
    """The options of the k-th of several trainings in one recovery (a gap phase, a
    --steps increment), k = 0, 1, ...: each has a seed of its own, since the data
    order and any augmentation are functions of the seed and the training step, and
    one seed for all would show each the same batches."""
    return dataclasses.replace(self, seed=self.seed + k)


def check(options: Options) -> None:
  """Flag errors, before any work."""
  if options.method not in METHODS:
    raise errors.UsageError(f"unknown --recover '{options.method}'; choose one of "
                            f"{', '.join(METHODS)}")
  if not options.data:
    raise errors.UsageError(f"--recover={options.method} needs --recover_data (images the "
                            "model takes; labels only for finetune)")
  if options.strategy not in STRATEGIES:
    raise errors.UsageError(f"unknown --strategy '{options.strategy}'; choose one of "
                            f"{', '.join(STRATEGIES)}")
  for name, value, least in (("recover_batch_size", options.batch_size, 1),
                             ("recover_train_steps", options.train_steps, 0),
                             ("calibration_samples", options.calibration_samples, 1),
                             ("checkpoint_every", options.checkpoint_every, 1),
                             ("log_every", options.log_every, 1),
                             ("gap_parts", options.gap_parts, 1),
                             ("gap_phase_steps", options.gap_phase_steps, 1)):
    if value < least:
      raise errors.UsageError(f"--{name} is {value}; it must be at least {least}")
  if not options.learning_rate > 0 or not options.temperature > 0:
    raise errors.UsageError("--learning_rate and --temperature must be positive")
  if options.augment.on and options.method == BN_RECALIBRATE:
    raise errors.UsageError("--recover_augment applies to the training recoveries (distill, "
                            "finetune, gap), not to bn_recalibrate")
  if options.batch_stats and options.method not in (DISTILL, FINETUNE):
    raise errors.UsageError("--recover_batch_stats applies to --recover=distill and finetune "
                            f"(not {options.method})")
  if options.probe_steps < -1:
    raise errors.UsageError(f"--recover_probe_steps is {options.probe_steps}; give -1 (a fifth "
                            "of --recover_train_steps), 0 (no probe) or a number of steps")
  if not 0.0 <= options.dropout < 1.0:
    raise errors.UsageError(f"--recover_dropout is {options.dropout}; it must be in [0, 1)")
  if options.dropout and options.method == BN_RECALIBRATE:
    raise errors.UsageError("--recover_dropout applies to the training recoveries (distill, "
                            "finetune, gap), not to bn_recalibrate")
  if not 0.0 <= options.distill_weight <= 1.0:
    raise errors.UsageError(f"--distill_weight is {options.distill_weight}; it must be in [0, 1]")
