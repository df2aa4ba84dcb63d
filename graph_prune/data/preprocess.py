"""Preprocessing and batching: resize, scale, per-channel mean/std, in a tf.data pipeline.

The order is the usual one: resize the stored pixels (bilinear), multiply by
`scale`, subtract `mean`, divide by `std`. Mean and std are per channel (the
last axis), or one value for all channels.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional, Sequence

from graph_prune import errors
from graph_prune import lazy
from graph_prune.data import sources

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
tf = lazy.module("tensorflow")


@dataclasses.dataclass(frozen=True)
class Preprocess:
  resize: Optional[tuple[int, int]] = None  # (H, W)
  scale: float = 1.0
  mean: tuple[float, ...] = ()
  std: tuple[float, ...] = ()

  def to_json(self) -> dict:
    return {"resize": list(self.resize) if self.resize else None, "scale": self.scale,
            "mean": list(self.mean), "std": list(self.std)}


def parse_resize(text: Optional[str]) -> Optional[tuple[int, int]]:
  """'H,W' (or 'HxW') -> (H, W)."""
  if not text:
    return None
  parts = text.replace("x", ",").split(",")
  try:
    size = tuple(int(p) for p in parts)
  except ValueError:
    size = ()
  if len(size) != 2 or min(size) < 1:
    raise errors.UsageError(f"--resize '{text}' is not H,W with positive integers, e.g. 224,224")
  return size


def parse_scale(text: Optional[str]) -> float:
  """A float, or a fraction such as '1/255'."""
  if text is None or text == "":
    return 1.0
  num, sep, den = text.partition("/")
  try:
    value = float(num) / float(den) if sep else float(num)
  except (ValueError, ZeroDivisionError):
    raise errors.UsageError(f"--scale '{text}' is not a number or a fraction such as 1/255"
                            ) from None
  return value


def parse_floats(values: Sequence[str], flag: str) -> tuple[float, ...]:
  try:
    return tuple(float(v) for v in values)
  except ValueError:
    raise errors.UsageError(f"--{flag} '{','.join(values)}' is not a list of numbers, e.g. "
                            "0.485,0.456,0.406") from None


def check(preprocess: Preprocess, channels: Optional[int], images: bool) -> None:
  """Mean/std must give one value, or one per channel; std must not be zero."""
  if preprocess.resize and not images:
    raise errors.UsageError("--resize applies to images; these samples are not [H, W, C] images")
  for name, values in (("mean", preprocess.mean), ("std", preprocess.std)):
    if len(values) > 1 and channels is not None and len(values) != channels:
      raise errors.UsageError(f"--{name} has {len(values)} values, but the samples have "
                              f"{channels} channels; give one value or one per channel")
  if any(s == 0 for s in preprocess.std):
    raise errors.UsageError("--std has a zero; standard deviations must be non-zero")


def batches(examples: sources.Examples, preprocess: Preprocess, batch_size: int,
            sample_shape: Optional[Sequence[Optional[int]]] = None,
            max_samples: int = 0) -> tf.data.Dataset:
  """(float32 samples [B, ...], int64 labels [B]) batches, prefetched.

  `sample_shape` (None for a free dimension) is enforced on every preprocessed
  sample, so that a sample that does not fit fails with its own shape in the
  error instead of somewhere inside the model.
  """
  if batch_size < 1:
    raise errors.UsageError(f"--batch_size is {batch_size}; it must be at least 1")
  ds = examples.dataset
  if max_samples > 0:
    ds = ds.take(max_samples)
  ds = ds.map(mapper(preprocess, sample_shape), num_parallel_calls=tf.data.AUTOTUNE)
  return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def mapper(preprocess: Preprocess, sample_shape: Optional[Sequence[Optional[int]]] = None):
  """The per-sample function (sample, label) -> (float32 preprocessed sample, label)."""
  mean = tf.constant(preprocess.mean, tf.float32) if preprocess.mean else None
  std = tf.constant(preprocess.std, tf.float32) if preprocess.std else None

  def apply(x, label):
    x = tf.cast(x, tf.float32)
    if preprocess.resize:
      x = tf.image.resize(x, preprocess.resize, method="bilinear")
    if preprocess.scale != 1.0:
      x = x * preprocess.scale
    if mean is not None:
      x = x - mean
    if std is not None:
      x = x / std
    if sample_shape is not None:
      x = tf.ensure_shape(x, sample_shape)
    return x, label
  return apply
