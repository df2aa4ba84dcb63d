"""Distillation and fine-tuning of a pruned frozen graph, with checkpoints that resume.

Loss per sample: distill, T^2 * KL(softmax(teacher/T) || softmax(student/T)) (Hinton
et al.), needing no labels; finetune, cross-entropy on the labels, mixed with the
distillation term by --distill_weight. Adam, linear warm-up then cosine decay.
With --recover_augment the batches are augmented (recover.augment) before the
teacher and the student see them, so both score the same inputs. With
--recover_batch_stats the student normalises by batch statistics at every folded
batch norm, folded back at the end (recover.batch_stats); with --recover_dropout it
drops inputs of its classifier (recover.dropout).

The data order is a function of the seed and the step alone (seeded shuffle,
repeat, batch, skip the steps already done), so a resumed run sees the batches an
uninterrupted run would have seen.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from typing import Mapping, Optional

from absl import logging
import numpy as np

from graph_prune import errors
from graph_prune import files
from graph_prune.adapters import tf_model
from graph_prune.adapters import tf_trainable
from graph_prune.recover import augment as augment_lib
from graph_prune.recover import batch_stats as batch_stats_lib
from graph_prune.recover import calibrate
from graph_prune.recover import data as data_lib
from graph_prune.recover import dropout as dropout_lib
from graph_prune.recover import options as options_lib

tf = tf_model.tf

_SHUFFLE_BUFFER = 16384
_FINGERPRINT_FILE = "recovery.json"
_LABEL_CHECK = "graph_prune: label out of range"


def _optimizer(options: options_lib.Options):
  import keras  # pylint: disable=g-import-not-at-top
  steps = max(options.train_steps, 1)
  warmup = min(steps // 10, 500)
  schedule = keras.optimizers.schedules.CosineDecay(
      initial_learning_rate=0.0 if warmup else options.learning_rate,
      decay_steps=max(steps - warmup, 1), alpha=0.0,
      warmup_target=options.learning_rate if warmup else None, warmup_steps=warmup)
  return keras.optimizers.Adam(schedule), schedule


def _per_sample_loss(student, teacher, labels, options: options_lib.Options,
                     lam=None, partner=None):
  """`lam`, `partner`: mixup's weights and partner samples (recover.augment), whose
  labels the cross-entropy mixes; the teacher already scored the mixed inputs."""
  t = options.temperature
  soft = tf.nn.softmax(teacher / t)
  kd = tf.reduce_sum(soft * (tf.math.log(soft + 1e-12) - tf.nn.log_softmax(student / t)),
                     axis=-1) * (t * t)
  if options.method == options_lib.DISTILL:
    return kd
  classes = tf.shape(student, out_type=tf.int64)[-1]
  with tf.control_dependencies([
      tf.debugging.assert_non_negative(labels, message=_LABEL_CHECK),
      tf.debugging.assert_less(labels, classes, message=_LABEL_CHECK)]):
    ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=student)
    if lam is not None:
      ce = lam * ce + (1.0 - lam) * tf.nn.sparse_softmax_cross_entropy_with_logits(
          labels=tf.gather(labels, partner), logits=student)
  w = options.distill_weight
  return (1.0 - w) * ce + w * kd if w else ce


def _checkpoint_dir(path: Optional[str], pruned: tf_model.TFModel,
                    options: options_lib.Options) -> Optional[str]:
  """Checks that a directory with checkpoints belongs to this recovery."""
  if not path:
    return None
  ensure_dir(path)
  marker = os.path.join(path, _FINGERPRINT_FILE)
  fp = fingerprint(pruned, options)
  if os.path.exists(marker):
    with open(marker, encoding="utf-8") as f:
      if json.load(f).get("fingerprint") != fp:
        raise errors.UsageError(f"--checkpoint_dir '{path}' holds checkpoints of another model "
                                "or other recovery flags; give an empty directory")
  elif tf.train.latest_checkpoint(path):
    raise errors.UsageError(f"--checkpoint_dir '{path}' holds checkpoints graph_prune did not "
                            "write; give an empty directory")
  else:
    files.write_json(marker, {"fingerprint": fp, "method": options.method})
  return path


def train(teacher, pruned: tf_model.TFModel, logits: str,
          data: data_lib.Data, options: options_lib.Options,
          checkpoint_dir: Optional[str] = None,
          masks: Optional[Mapping[str, np.ndarray]] = None,
          step_offset: int = 0) -> tuple[tf_model.TFModel, dict]:
  """Trains the pruned model's weights against `teacher` (the original's logits as a
  function of the input) and the labels; returns the model with the trained
  weights and the training report. `masks` (constant -> boolean array) keeps
  weights at zero where they are False, after every step (grow-and-prune trains a
  full-width model that must stay equal to a pruned one). With
  options.tensorboard_dir, each progress line is also written as TensorBoard
  scalars at step step_offset + the step (grow-and-prune's phases continue one
  curve)."""
  checkpoint_dir = _checkpoint_dir(checkpoint_dir, pruned, options)
  strategy = make_strategy(options.strategy)
  replicas = strategy.num_replicas_in_sync
  if options.batch_size % replicas:
    raise errors.UsageError(f"--recover_batch_size {options.batch_size} does not split over "
                            f"{replicas} replicas; give a multiple of {replicas}")
  normalised = calibration = classifier = None
  net, names = pruned, None
  # The pruned graph's view, built once for the additions that look at it.
  graph = tf_model.to_view(pruned) if options.batch_stats or options.dropout else None
  if options.batch_stats:
    calibration = calibrate.calibration_inputs(data, options.calibration_samples)
    normalised = batch_stats_lib.insert(pruned, logits, calibration, graph)
    net = normalised.model
    names = normalised.weights(pruned) + normalised.constants
  if options.dropout:  # adds scalars only: the trained weights stay those of `net`
    net, classifier = dropout_lib.insert(net, logits, options.dropout, graph)
  with strategy.scope():
    student = tf_trainable.Trainable(net, fetches=[logits], trainable=names)
    optimizer, schedule = _optimizer(options)
    optimizer.build(student.weights)
    masked = [(w, tf.constant(masks[n], w.dtype)) for n, w in
              zip(student.weight_names, student.weights) if masks and n in masks]
  ckpt = tf.train.Checkpoint(weights=student.weights, optimizer=optimizer)
  manager = None
  start = 0
  if checkpoint_dir:
    manager = tf.train.CheckpointManager(ckpt, checkpoint_dir, max_to_keep=2)
    if manager.latest_checkpoint:
      ckpt.restore(manager.latest_checkpoint).assert_existing_objects_matched()
      start = int(optimizer.iterations.numpy())
      logging.info("recover %s: resuming from step %d (%s)", options.method, start,
                   manager.latest_checkpoint)
  steps = options.train_steps
  ds = (data.train.shuffle(_SHUFFLE_BUFFER, seed=options.seed, reshuffle_each_iteration=True)
        .repeat().batch(options.batch_size, drop_remainder=True).skip(start)
        .prefetch(tf.data.AUTOTUNE))
  iterator = iter(strategy.experimental_distribute_dataset(ds))
  global_batch = options.batch_size

  def replica_step(x, labels):
    replica = tf.distribute.get_replica_context().replica_id_in_sync_group
    seed = tf.stack([tf.constant(options.seed, tf.int64),
                     optimizer.iterations * replicas + tf.cast(replica, tf.int64)])
    if options.augment.on:
      x, lam, partner = augment_lib.apply(options.augment, x, seed)
    else:
      lam = partner = None
    t = teacher(x)
    with tf.GradientTape() as tape:
      # Dropout's masks: another stream than augmentation's, from the same step seed.
      s = (student(x, seed + tf.constant([0, 1 << 40], tf.int64)) if options.dropout
           else student(x))[0]
      loss = tf.nn.compute_average_loss(_per_sample_loss(s, t, labels, options, lam, partner),
                                        global_batch_size=global_batch)
    grads = tape.gradient(loss, student.weights)
    optimizer.apply_gradients(zip(grads, student.weights))
    for w, m in masked:
      w.assign(w * m)
    predicted = tf.argmax(s, -1)
    same = tf.reduce_sum(tf.cast(tf.equal(predicted, tf.argmax(t, -1)), tf.float32))
    # Label accuracy where there are labels (finetune); unlabelled samples read -1.
    right = tf.reduce_sum(tf.cast(tf.equal(predicted, labels), tf.float32))
    return loss, same, right

  @tf.function
  def step(it):
    x, labels = next(it)
    per_replica = strategy.run(replica_step, args=(x, labels))
    return tuple(strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None) for v in per_replica)

  history = []
  writer = (tf.summary.create_file_writer(options.tensorboard_dir)
            if options.tensorboard_dir else None)
  labelled = options.method == options_lib.FINETUNE
  window_loss, window_same, window_right, window_n = 0.0, 0.0, 0.0, 0
  t0 = time.perf_counter()
  last = t0
  for i in range(start, steps):
    try:
      loss, same, right = step(iterator)
    except tf.errors.OutOfRangeError:
      raise errors.InputError(f"recovery data '{data.spec}' has no samples") from None
    except tf.errors.InvalidArgumentError as e:
      lines = [l.strip() for l in e.message.strip().splitlines() if l.strip()]
      if any(_LABEL_CHECK in l for l in lines):
        raise errors.InputError(f"recovery data '{data.spec}' has a label out of range "
                                "(labels must be 0 .. number of classes - 1)") from None
      detail = next((l for l in lines if "Error" not in l[:20]), lines[0] if lines else "")
      raise errors.InputError(f"recovery step failed: {detail[:300]}") from None
    window_loss += float(loss)
    window_same += float(same)
    window_right += float(right)
    window_n += 1
    done = i + 1
    if done % options.log_every == 0 or done == steps:
      now = time.perf_counter()
      entry = {"step": done, "loss": window_loss / window_n,
               "agreement": window_same / (window_n * global_batch),
               "learning_rate": float(schedule(done)), "steps_per_s": window_n / (now - last)}
      if labelled:
        entry["accuracy"] = window_right / (window_n * global_batch)
      history.append(entry)
      if writer is not None:
        with writer.as_default():
          for key in ("loss", "agreement", "accuracy", "learning_rate", "steps_per_s"):
            if key in entry:
              tf.summary.scalar(f"recover/{key}", entry[key], step=step_offset + done)
        writer.flush()
      logging.info("recover %s: step %d/%d  loss %.4f  batch agreement %.3f%s  lr %.2e  "
                   "%.1f steps/s", options.method, done, steps, entry["loss"],
                   entry["agreement"],
                   f"  batch accuracy {entry['accuracy']:.3f}" if labelled else "",
                   entry["learning_rate"], entry["steps_per_s"])
      window_loss, window_same, window_right, window_n, last = 0.0, 0.0, 0.0, 0, now
    if manager and (done % options.checkpoint_every == 0 or done == steps):
      manager.save(checkpoint_number=done)
  if writer is not None:
    writer.close()
  train_s = time.perf_counter() - t0
  doc = {"train_steps": steps, "resumed_from_step": start, "batch_size": global_batch,
         "learning_rate": options.learning_rate, "strategy": options.strategy,
         "replicas": replicas, "train_s": round(train_s, 3), "history": history,
         "trainable_constants": len(student.weight_names),
         "trainable_params": int(sum(np.prod(w.shape) for w in student.weights))}
  if options.method == options_lib.DISTILL or options.distill_weight:
    doc["temperature"] = options.temperature
  if options.method == options_lib.FINETUNE:
    doc["distill_weight"] = options.distill_weight
  if options.augment.on:
    doc["augment"] = options.augment.to_json()
  if options.dropout:
    doc["dropout"] = {"rate": options.dropout, "layer": classifier}
  if normalised is None:
    return tf_trainable.with_values(pruned, student.values()), doc
  doc["batch_stats"] = {"layers": len(normalised.points), "calibration_samples": len(calibration),
                        "skipped": list(normalised.skipped[:20])}
  return batch_stats_lib.fold(pruned, normalised, student.values(), calibration), doc


def make_strategy(name: str):
  """default: the one device TensorFlow picks; mirrored: all local GPUs (without
  GPUs, every logical CPU device: that is how the tests run two replicas);
  tpu: the TPU system this host reaches."""
  if name == "mirrored":
    devices = (tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU"))
    return tf.distribute.MirroredStrategy([d.name for d in devices])
  if name == "tpu":
    try:
      resolver = tf.distribute.cluster_resolver.TPUClusterResolver()
      tf.config.experimental_connect_to_cluster(resolver)
      tf.tpu.experimental.initialize_tpu_system(resolver)
    except (ValueError, RuntimeError, tf.errors.OpError) as e:
      raise errors.UsageError(f"--strategy=tpu: no TPU found ({str(e).splitlines()[0]})"
                              ) from None
    return tf.distribute.TPUStrategy(resolver)
  return tf.distribute.get_strategy()


def fingerprint(pruned: tf_model.TFModel, options: options_lib.Options) -> str:
  """Identifies a recovery: the pruned graph and every option that changes its result."""
  h = hashlib.sha256(pruned.graph_def.SerializeToString(deterministic=True))
  fields = dataclasses.asdict(options)
  for key in ("checkpoint_dir", "checkpoint_every", "log_every", "tensorboard_dir"):
    fields.pop(key)
  for key, off in (("augment", not options.augment.on), ("batch_stats", not options.batch_stats),
                   ("dropout", not options.dropout)):
    if off:  # checkpoints written before the option existed still resume
      fields.pop(key)
  h.update(repr(sorted(fields.items())).encode())
  return h.hexdigest()


def ensure_dir(path: str) -> str:
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise errors.UsageError(f"cannot create --checkpoint_dir '{path}' ({e.strerror})") from None
  return path
