"""Grow-and-prune from scratch on the default model's architecture, against
training the dense model and pruning it, at the same number of steps.

Three runs of the same architecture (graph_prune.zoo.default_model.build_model),
seed, data, optimiser and learning-rate schedule (Adam, warm-up then one cosine
over all steps), each ending at the same target widths (a fraction `ratio` of
the channels of every convolution and of the hidden dense layer removed):

- gap: from random initialisation, every layer at its target width except one
  part of the layers (of `parts`), which is grown to full width (its missing
  channels re-initialised) for a phase of `phase_steps` steps and then pruned
  back to its target by |batch-norm scale| / std x filter L1 norm; the parts take
  turns; the last phase trains at the target widths only;
- dense_then_prune: the dense model trained for `dense_fraction` of the steps,
  pruned to the target widths by the same score, then trained the rest of the
  steps at the target widths;
- small_from_scratch: the target widths from the start, never grown.

Removed channels are held at zero by masks on the convolution or dense kernel's
output channels and on the batch norm's scale and offset (so the channel is
exactly zero after the batch norm and its ReLU, and a frozen export prunes to
the same function). Each run reports its test accuracy on the 10,000 test images.
"""

from __future__ import annotations

import time

from absl import logging
import numpy as np

from graph_prune.data import idx
from graph_prune.zoo import default_model

# (layer with the kernel, its batch norm): the layers whose width is pruned.
LAYERS = (("block1a_conv", "block1a_bn"), ("block1b_conv", "block1b_bn"),
          ("block2a_conv", "block2a_bn"), ("block2b_conv", "block2b_bn"),
          ("block3_conv", "block3_bn"), ("fc1", "fc1_bn"))
RUNS = ("gap", "dense_then_prune", "small_from_scratch")


class _Masked:
  """The model, its per-layer channel masks (variables, so the training step does
  not retrace) and the operations on them."""

  def __init__(self, model, ratio: float):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    self.model = model
    self.layers = [(model.get_layer(k), model.get_layer(b)) for k, b in LAYERS]
    self.widths = [int(k.kernel.shape[-1]) for k, _ in self.layers]
    self.targets = [max(1, int(round(w * (1 - ratio)))) for w in self.widths]
    self.masks = [tf.Variable(np.ones(w, np.float32), trainable=False) for w in self.widths]

  def pairs(self):
    """(variable, its mask variable) for every masked weight."""
    for (k, b), m in zip(self.layers, self.masks):
      yield k.kernel, m
      yield b.gamma, m
      yield b.beta, m

  def apply(self) -> None:
    for var, m in self.pairs():
      var.assign(var * m)

  def set(self, i: int, keep: np.ndarray) -> None:
    mask = np.zeros(self.widths[i], np.float32)
    mask[keep] = 1.0
    self.masks[i].assign(mask)

  def scores(self, i: int) -> np.ndarray:
    """|gamma| / std x filter L1: the magnitude of the folded filter."""
    k, b = self.layers[i]
    w = np.abs(k.kernel.numpy()).reshape(-1, self.widths[i]).sum(axis=0)
    std = np.sqrt(b.moving_variance.numpy() + b.epsilon)
    return w * np.abs(b.gamma.numpy()) / std

  def prune(self, i: int) -> None:
    """Layer i back to its target width: the highest scores among the live channels."""
    live = self.masks[i].numpy() > 0
    s = np.where(live, self.scores(i), -np.inf)
    self.set(i, np.argsort(-s, kind="stable")[:self.targets[i]])

  def grow(self, i: int) -> None:
    """Layer i at full width: its masked channels re-initialised (kernel from the
    layer's initializer, batch norm scale 1 and offset 0)."""
    k, b = self.layers[i]
    dead = self.masks[i].numpy() == 0
    if dead.any():
      fresh = k.kernel_initializer(k.kernel.shape).numpy()
      kernel = k.kernel.numpy()
      kernel[..., dead] = fresh[..., dead]
      k.kernel.assign(kernel)
      gamma, beta = b.gamma.numpy(), b.beta.numpy()
      gamma[dead], beta[dead] = 1.0, 0.0
      b.gamma.assign(gamma)
      b.beta.assign(beta)
    self.masks[i].assign(np.ones(self.widths[i], np.float32))


def train_run(run: str, x, y, x_test, y_test, ratio: float, steps: int, batch_size: int,
           learning_rate: float, seed: int, parts: int, phase_steps: int,
           dense_fraction: float) -> dict:
  """One run on (x, y) for `steps` steps, evaluated on (x_test, y_test); the result
  holds the trained Keras model under "model"."""
  import keras  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  keras.utils.set_random_seed(seed)
  model = default_model.build_model()
  masked = _Masked(model, ratio)
  n = len(masked.layers)
  groups = [list(range(p, n, parts)) for p in range(parts)]
  warmup = min(steps // 12, 200)
  schedule = keras.optimizers.schedules.CosineDecay(
      initial_learning_rate=0.0, decay_steps=steps - warmup, alpha=0.0,
      warmup_target=learning_rate, warmup_steps=warmup)
  optimizer = keras.optimizers.Adam(schedule)
  loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
  pairs = list(masked.pairs())

  @tf.function
  def step(xb, yb):
    with tf.GradientTape() as tape:
      loss = loss_fn(yb, model(xb, training=True))
    grads = tape.gradient(loss, model.trainable_variables)
    optimizer.apply_gradients(zip(grads, model.trainable_variables))
    for var, m in pairs:
      var.assign(var * tf.reshape(m, [1] * (len(var.shape) - 1) + [-1]))
    return loss

  # Every layer starts at its target width (the first channels), except where the
  # run trains dense first.
  if run != "dense_then_prune":
    for i in range(n):
      masked.set(i, np.arange(masked.targets[i]))
    masked.apply()
  prune_at = int(steps * dense_fraction)
  phases = max(1, steps // phase_steps - 1)     # the last phase: target widths only
  events = []
  rng = np.random.default_rng(seed)
  order = np.arange(len(x))
  t0 = time.monotonic()
  pos = len(order)
  loss = 0.0
  for s in range(steps):
    if run == "gap" and s % phase_steps == 0:
      phase = s // phase_steps
      if phase > 0 and phase - 1 < phases:
        for i in groups[(phase - 1) % parts]:
          masked.prune(i)
        masked.apply()
      if phase < phases:
        for i in groups[phase % parts]:
          masked.grow(i)
        events.append({"step": s, "grown": [LAYERS[i][0] for i in groups[phase % parts]]})
    if run == "dense_then_prune" and s == prune_at:
      for i in range(n):
        masked.prune(i)
      masked.apply()
      events.append({"step": s, "pruned": "all"})
    if pos + batch_size > len(order):
      rng.shuffle(order)
      pos = 0
    b = order[pos:pos + batch_size]
    pos += batch_size
    loss = float(step(x[b], y[b]))
    if (s + 1) % 200 == 0:
      logging.info("%s: step %d/%d loss %.4f", run, s + 1, steps, loss)
  logits = np.concatenate([model(x_test[i:i + 1000], training=False).numpy()
                           for i in range(0, len(x_test), 1000)])
  widths = [int(m.numpy().sum()) for m in masked.masks]
  if widths != masked.targets:
    raise AssertionError(f"{run} ended at widths {widths}, not {masked.targets}")
  return {"run": run, "test_accuracy": float((logits.argmax(1) == y_test).mean()),
          "widths": widths, "steps": steps,
          "final_loss": loss, "train_seconds": round(time.monotonic() - t0, 1),
          "events": events, "model": model}


def pruned_for_real(model, ratio: float, work_dir: str) -> dict:
  """The masked model frozen and pruned by graph_prune (l1 at `ratio` removes exactly
  the masked channels, whose folded weights are zero; the oracle checks it): its
  parameters and the pruned GraphDef's test accuracy."""
  import os  # pylint: disable=g-import-not-at-top
  from graph_prune import pipeline  # pylint: disable=g-import-not-at-top
  inference = default_model.build_model()
  inference.set_weights(model.get_weights())
  src, out = os.path.join(work_dir, "masked.pb"), os.path.join(work_dir, "pruned.pb")
  default_model.export_frozen_graph(inference, src)
  doc = pipeline.prune(src, out, pipeline.Options(ratio=ratio, overwrite=True))
  x_test, y_test = idx.load_split(idx.FASHION_MNIST_DIR, "test")
  logits = default_model.frozen_graph_logits(out, x_test)
  return {"params_pruned": doc["params_after"],
          "verify_max_rel_diff": doc["verify"]["max_rel_diff"],
          "pruned_test_accuracy": float((logits.argmax(1) == y_test).mean()),
          "widths_pruned": [g["channels_after"] for g in doc["groups"]]}


def compare(data_dir: str, ratio: float = 0.75, epochs: int = 3, batch_size: int = 128,
            learning_rate: float = 3e-3, seed: int = 0, parts: int = 3,
            phase_steps: int = 150, dense_fraction: float = 2 / 3, runs=RUNS) -> list[dict]:
  """The runs' results (each with its Keras model under "model")."""
  x, y = idx.load_split(data_dir, "train")
  x_test, y_test = idx.load_split(data_dir, "test")
  steps = epochs * -(-len(x) // batch_size)
  out = []
  for run in runs:
    result = train_run(run, x, y, x_test, y_test, ratio, steps, batch_size, learning_rate, seed,
                    parts, phase_steps, dense_fraction)
    logging.info("%s: test accuracy %.4f, widths %s, %.0f s", run, result["test_accuracy"],
                 result["widths"], result["train_seconds"])
    out.append(result)
  return out
