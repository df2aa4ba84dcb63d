"""The recovery flags, shared by //tools:prune and //tools:sweep.

The preprocessing flags (--resize, --scale, --mean, --std) and --data_dir belong to
each tool: the recovery data is preprocessed like the tool's other data, for the
same model input.
"""

from absl import flags

from graph_prune import errors
from graph_prune.data import preprocess as preprocess_lib
from tools import calibration_flags

RECOVER = flags.DEFINE_enum(
    "recover", "none", ["none", "distill", "finetune", "bn_recalibrate", "gap"],
    "After pruning: distill from the original on unlabelled data, finetune on labels "
    "(optionally mixed with distillation), bn_recalibrate (no gradient steps), or gap "
    "(grow-and-prune: parts of the pruned groups take turns at full width while the model "
    "is distilled, and are pruned back by the criterion on the trained weights).")
RECOVER_DATA = flags.DEFINE_string(
    "recover_data", None, "Recovery data: .npz (x, and y for finetune), TFRecords, class "
    "folders, IDX files or fashion-mnist:train (default: --calibration_data).")
RECOVER_SPLIT = flags.DEFINE_string("recover_split", "train",
                                    "IDX split (train or test) of an IDX directory.")
RECOVER_BATCH = flags.DEFINE_integer("recover_batch_size", 64,
                                     "Global batch size of recovery training.")
RECOVER_STEPS = flags.DEFINE_integer("recover_train_steps", 1000,
                                     "Gradient steps of each recovery.")
LEARNING_RATE = flags.DEFINE_float("learning_rate", 1e-3, "Peak Adam learning rate "
                                   "(linear warm-up, cosine decay).")
TEMPERATURE = flags.DEFINE_float("temperature", 4.0, "Distillation temperature.")
DISTILL_WEIGHT = flags.DEFINE_float("distill_weight", 0.0,
                                    "finetune: weight of the distillation term, [0, 1].")
HOLDOUT = flags.DEFINE_integer("holdout_samples", 2000, "Samples kept out of recovery; "
                               "agreement with the original is reported on them.")
STRATEGY = flags.DEFINE_enum("strategy", "default", ["default", "mirrored", "tpu"],
                             "tf.distribute strategy of recovery training: one device, "
                             "mirrored over local GPUs, or TPU.")
CHECKPOINT_DIR = flags.DEFINE_string(
    "checkpoint_dir", None, "Recovery checkpoints; a re-run with the same flags resumes there.")
TENSORBOARD_DIR = flags.DEFINE_string(
    "tensorboard_dir", None, "Write the training's loss, agreement, label accuracy and "
    "learning rate as TensorBoard scalars here.")
CHECKPOINT_EVERY = flags.DEFINE_integer("checkpoint_every", 200, "Steps between checkpoints.")
LOG_EVERY = flags.DEFINE_integer("log_every", 100, "Steps between progress lines.")
GAP_PARTS = flags.DEFINE_integer("gap_parts", 4, "gap: the pruned groups are cut into this "
                                 "many parts, grown in turn.")
GAP_PHASE_STEPS = flags.DEFINE_integer("gap_phase_steps", 250, "gap: distillation steps per "
                                       "phase; --recover_train_steps / this many phases.")
RECOVER_AUGMENT = flags.DEFINE_list(
    "recover_augment", [], "Augment the training batches, the original and the pruned model "
    "seeing the same augmented inputs: flip (left-right), shift=N (pixels), mixup=A (Beta "
    "concentration), e.g. flip,shift=2,mixup=0.4.")
RECOVER_BATCH_STATS = flags.DEFINE_bool(
    "recover_batch_stats", False, "distill, finetune: train with a normalisation by batch "
    "statistics after every folded batch norm (per-channel shift after a linear layer), "
    "folded back into the constants at the end with statistics of --calibration_samples "
    "training inputs. Under --strategy=mirrored each replica normalises by its own share "
    "of the batch.")
RECOVER_DROPOUT = flags.DEFINE_float(
    "recover_dropout", 0.0, "distill, finetune, gap: in training, drop each input of the layer "
    "producing the logits (a dense or convolution classifier) with this probability, as "
    "the model's own dropout did before it was frozen; 0: off.")
RECOVER_PROBE_STEPS = flags.DEFINE_integer(
    "recover_probe_steps", -1, "--mode=mixed with --recover=distill or finetune: each "
    "candidate (a count of layers removed, filters for the rest of the budget) is recovered "
    "for this many steps and the one that then agrees most with the original on the held-out "
    "samples wins; -1: a fifth of --recover_train_steps; 0: no probe (the candidate whose "
    "outputs lose least of the original's, before recovery).")
RECOVER_OUTPUT = flags.DEFINE_string("recover_output", None, "Output with the class scores "
                                     "(default: the first; a Softmax's input is used).")


def options(cli, preprocess: preprocess_lib.Preprocess, data_dir, seed: int):
  """recover options from the flags, or None without --recover; `cli` (tools/cli.py)
  resolves relative paths the way the calling tool does."""
  if RECOVER.value == "none":
    if RECOVER_AUGMENT.value:
      raise errors.UsageError("--recover_augment augments recovery training; give --recover")
    if RECOVER_BATCH_STATS.value:
      raise errors.UsageError("--recover_batch_stats changes recovery training; give --recover")
    if RECOVER_DROPOUT.value:
      raise errors.UsageError("--recover_dropout changes recovery training; give --recover")
    if RECOVER_PROBE_STEPS.value != -1:
      raise errors.UsageError("--recover_probe_steps recovers --mode=mixed's candidates "
                              "briefly; give --recover")
    return None
  # pylint: disable=g-import-not-at-top
  from graph_prune.recover import augment as augment_lib
  from graph_prune.recover import options as options_lib
  return options_lib.Options(
      method=RECOVER.value,
      data=cli.data_path(RECOVER_DATA.value or calibration_flags.CALIBRATION_DATA.value) or "",
      data_dir=data_dir,
      split=RECOVER_SPLIT.value, preprocess=preprocess,
      batch_size=RECOVER_BATCH.value, train_steps=RECOVER_STEPS.value,
      learning_rate=LEARNING_RATE.value, temperature=TEMPERATURE.value,
      distill_weight=DISTILL_WEIGHT.value, calibration_samples=calibration_flags.CALIBRATION_SAMPLES.value,
      holdout_samples=HOLDOUT.value, strategy=STRATEGY.value,
      checkpoint_dir=cli.path(CHECKPOINT_DIR.value), checkpoint_every=CHECKPOINT_EVERY.value,
      log_every=LOG_EVERY.value, seed=seed, output=RECOVER_OUTPUT.value,
      gap_parts=GAP_PARTS.value, gap_phase_steps=GAP_PHASE_STEPS.value,
      augment=augment_lib.parse(RECOVER_AUGMENT.value), batch_stats=RECOVER_BATCH_STATS.value,
      dropout=RECOVER_DROPOUT.value, probe_steps=RECOVER_PROBE_STEPS.value,
      tensorboard_dir=cli.path(TENSORBOARD_DIR.value))
