"""Augmentation of the recovery batches, seen alike by the teacher and the student.

Distillation transfers the original's function only where it is shown inputs;
showing it the same training images again and again is what limits long
recoveries. Beyer et al. ("Knowledge distillation: a good teacher is patient and
consistent", 2022) match the functions on augmented inputs instead, the teacher
and the student seeing the *same* augmented image (consistent), and find that this
is what lets longer schedules keep paying. Here:

- flip: each image mirrored left-right with probability 1/2;
- shift=N: each image moved by a random whole number of pixels in [-N, N] along
  each spatial axis (edges mirrored into the gap);
- mixup=A: each sample replaced by lam * x + (1 - lam) * x' with x' the previous
  sample of the (shuffled) batch and lam ~ Beta(A, A) (Zhang et al. 2018). Distillation needs
  no labels for it (the teacher scores the mixed image); fine-tuning mixes the two
  samples' cross-entropies by the same lam.

The images are [batch, height, width, channels] (what the data sources give and
the preprocessing scales per channel). The random numbers are a function of the
seed, the step and the replica alone (stateless ops), so a resumed recovery sees
the batches an uninterrupted one would have seen. With mixup and labels, the
logged batch accuracy compares the prediction with the first sample's label.

Parsing and checks need no TensorFlow (the tools check flags before importing it).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from graph_prune import errors
from graph_prune import lazy

tf = lazy.module("tensorflow")

_MAX_SHIFT = 64


@dataclasses.dataclass(frozen=True)
class Augment:
  flip: bool = False
  shift: int = 0         # pixels, each spatial axis
  mixup: float = 0.0     # Beta(A, A) concentration; 0: off

  @property
  def on(self) -> bool:
    return self.flip or self.shift > 0 or self.mixup > 0

  @property
  def spatial(self) -> bool:
    """Needs [batch, height, width, channels] images."""
    return self.flip or self.shift > 0

  def to_json(self) -> dict:
    return dataclasses.asdict(self)

  def flag_value(self) -> str:
    """What parse() reads back: 'flip,shift=2,mixup=0.4' ('' when off)."""
    return ",".join(["flip"] * self.flip + [f"shift={self.shift}"] * bool(self.shift) +
                    [f"mixup={self.mixup:g}"] * bool(self.mixup))


def parse(entries: Sequence[str]) -> Augment:
  """['flip', 'shift=2', 'mixup=0.4'] -> Augment; 'shift' alone is 2 pixels,
  'mixup' alone is A = 0.4."""
  flip, shift, mixup = False, 0, 0.0
  seen = set()
  for entry in entries:
    entry = entry.strip()
    if not entry:
      continue
    name, sep, value = entry.partition("=")
    name = name.strip()
    if name in seen:
      raise errors.UsageError(f"--recover_augment names '{name}' twice")
    seen.add(name)
    if name == "flip":
      if sep:
        raise errors.UsageError("--recover_augment: 'flip' takes no value")
      flip = True
    elif name == "shift":
      try:
        shift = int(value) if sep else 2
      except ValueError:
        shift = -1
      if not 1 <= shift <= _MAX_SHIFT:
        raise errors.UsageError(f"--recover_augment: 'shift={value}' must be a whole number "
                                f"of pixels, 1 to {_MAX_SHIFT}")
    elif name == "mixup":
      try:
        mixup = float(value) if sep else 0.4
      except ValueError:
        mixup = -1.0
      if not 0 < mixup <= 100:
        raise errors.UsageError(f"--recover_augment: 'mixup={value}' must be a Beta "
                                "concentration in (0, 100], e.g. 0.4")
    else:
      raise errors.UsageError(f"--recover_augment: unknown '{name}'; give flip, shift=N "
                              "(pixels) or mixup=A (Beta concentration)")
  return Augment(flip, shift, mixup)


def check_images(augment: Augment, sample_shape, images: bool, spec: str) -> None:
  """flip and shift need [height, width, channels] images, and a shift smaller than
  their height and width (the mirrored edge is cut from the image itself)."""
  if not augment.spatial:
    return
  if not images or sample_shape is None or len(sample_shape) != 3:
    raise errors.UsageError(f"--recover_augment flip/shift need images [height, width, "
                            f"channels]; recovery data '{spec}' gives samples of shape "
                            f"{list(sample_shape) if sample_shape is not None else 'unknown'}")
  height, width = sample_shape[0], sample_shape[1]
  if augment.shift and height and width and augment.shift >= min(height, width):
    raise errors.UsageError(f"--recover_augment: shift={augment.shift} is not smaller than "
                            f"the images ({height} x {width})")


def apply(augment: Augment, x, seed):
  """The augmented batch and, for mixup, (lam [batch], partner index [batch]);
  (x, None, None) without mixup. `seed`: an integer [2] tensor, distinct per step
  and replica."""
  if not augment.on:
    return x, None, None
  seeds = tf.random.experimental.stateless_split(seed, 4)
  batch = tf.shape(x)[0]
  if augment.flip:
    mirror = tf.random.stateless_uniform([batch], seeds[0]) < 0.5
    x = tf.where(mirror[:, None, None, None], tf.reverse(x, axis=[2]), x)
  if augment.shift:
    n = augment.shift
    height, width = tf.shape(x)[1], tf.shape(x)[2]
    padded = tf.pad(x, [[0, 0], [n, n], [n, n], [0, 0]], mode="SYMMETRIC")
    offsets = tf.random.stateless_uniform([2, batch], seeds[1], minval=0, maxval=2 * n + 1,
                                          dtype=tf.int32)
    rows = offsets[0][:, None] + tf.range(height)[None, :]
    cols = offsets[1][:, None] + tf.range(width)[None, :]
    x = tf.gather(padded, rows, axis=1, batch_dims=1)
    x = tf.gather(x, cols, axis=2, batch_dims=1)
  if not augment.mixup:
    return x, None, None
  a = tf.fill([batch], tf.constant(augment.mixup, x.dtype))
  g1 = tf.random.stateless_gamma([batch], seeds[2], alpha=a, dtype=x.dtype)
  g2 = tf.random.stateless_gamma([batch], seeds[3], alpha=a, dtype=x.dtype)
  lam = g1 / tf.maximum(g1 + g2, 1e-12)
  partner = tf.roll(tf.range(batch), shift=1, axis=0)  # the previous sample, never itself
  shape = tf.concat([[batch], tf.ones([tf.rank(x) - 1], tf.int32)], 0)
  w = tf.reshape(lam, shape)
  return w * x + (1.0 - w) * tf.gather(x, partner), lam, partner
