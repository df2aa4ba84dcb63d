"""The recovery data: preprocessed samples, split into a holdout part (agreement
with the original is measured on it) and a training part, checked against the
model's input."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import numpy as np

from graph_prune import errors
from graph_prune.adapters import tf_model
from graph_prune.data import preprocess as preprocess_lib
from graph_prune.data import sources
from graph_prune.recover import augment as augment_lib
from graph_prune.recover.options import Options

tf = tf_model.tf


@dataclasses.dataclass(frozen=True)
class Data:
  """Preprocessed samples split into a holdout part and a training part."""
  train: Any           # tf.data.Dataset of (x, label), unbatched
  holdout: np.ndarray  # [H, ...] float32
  train_count: Optional[int]
  spec: str


def load_data(model: tf_model.TFModel, options: Options, labels: bool) -> Data:
  """The recovery data, checked against the model's input."""
  if len(model.inputs) != 1:
    raise errors.UsageError(f"recovery feeds one input; the model has {len(model.inputs)}")
  shape = _input_shape(model)
  want = tuple(shape[1:]) if shape is not None else None
  source = sources.resolve(options.data, options.data_format, options.data_dir, options.split)
  examples = sources.examples(source, labels=labels)
  got = examples.sample_shape
  if got is not None and options.preprocess.resize and len(got) == 3:
    got = tuple(options.preprocess.resize) + got[2:]
  channels = want[-1] if want else None
  preprocess_lib.check(options.preprocess, channels, examples.images)
  if got is not None and want is not None and (
      len(got) != len(want) or any(g and w and g != w for g, w in zip(got, want))):
    raise errors.InputError(f"recovery data '{options.data}' gives samples of shape "
                            f"{list(got)}, but the model takes {list(want)}; give --resize=H,W "
                            "or data of the model's input shape")
  # The samples' shape as the model takes them: dimensions the source leaves open
  # (class folders, TFRecords) from the model's input.
  shape = got if want is None else want if got is None else tuple(
      g or w for g, w in zip(got, want))
  augment_lib.check_images(options.augment, shape, examples.images, options.data)
  ds = examples.dataset.map(preprocess_lib.mapper(options.preprocess, want),
                            num_parallel_calls=tf.data.AUTOTUNE)
  holdout = options.holdout_samples
  if examples.count is not None:
    holdout = min(holdout, examples.count // 5)
  held = as_numpy(ds.take(holdout), options.data)
  held = np.concatenate(held) if held else np.zeros((0,) + tuple(want or ()), np.float32)
  count = examples.count - holdout if examples.count is not None else None
  if count == 0:
    raise errors.InputError(f"recovery data '{options.data}' has no samples left for training")
  return Data(ds.skip(holdout), held, count, options.data)


def as_numpy(ds, spec: str) -> list[np.ndarray]:
  """The inputs of a dataset of (x, label), in batches of up to 1024; an error reading
  them is one line."""
  try:
    return [x for x, _ in ds.batch(1024).as_numpy_iterator()]
  except tf.errors.OpError as e:
    raise errors.InputError(f"reading recovery data '{spec}' failed: "
                            f"{e.message.strip().splitlines()[0]}") from None


def _input_shape(model: tf_model.TFModel):
  """The input's shape: a Placeholder's attribute, read without importing the graph
  (which would copy every weight); TensorFlow's shape inference for other tensors."""
  name = model.inputs[0]
  node = next((n for n in model.graph_def.node if n.name == name.split(":")[0]), None)
  if node is not None and node.op == "Placeholder" and name.endswith(":0"):
    shape = node.attr["shape"].shape
    return None if shape.unknown_rank else tuple(d.size if d.size >= 0 else None
                                                 for d in shape.dim)
  return tf_model.to_view(model).shape(name)
