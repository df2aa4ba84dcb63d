"""Calibration samples: a few thousand unlabelled inputs, as the model takes them.

Calibrated criteria and reconstruction read activations of the model on these.
Any data source graph_prune.data reads serves (a .npz with `x` alone among
them), preprocessed as for evaluation, brought to the model input's layout and
dtype, checked (shape, count, finite values), and split into the samples the
work uses and a held-out part on which its result is measured.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from graph_prune import errors
from graph_prune.data import layout as layout_lib
from graph_prune.data import preprocess as preprocess_lib
from graph_prune.data import sources

tf = sources.tf


@dataclasses.dataclass(frozen=True)
class Samples:
  """Inputs of the model's one input, in its layout and dtype."""
  fit: np.ndarray       # what calibration and reconstruction use
  holdout: np.ndarray   # kept out of them; their result is measured here
  spec: str

  def to_json(self) -> dict:
    return {"data": self.spec, "samples": int(len(self.fit)),
            "holdout": int(len(self.holdout))}

  def measuring(self) -> np.ndarray:
    """What a result is measured on: the held-out samples, or the first 256 used
    ones when none are held out."""
    return self.holdout if len(self.holdout) else self.fit[:256]


@dataclasses.dataclass(frozen=True)
class Spec:
  """Where the calibration samples come from; `load` reads them for a model."""
  data: str
  data_format: str = "auto"
  data_dir: Optional[str] = None   # Fashion-MNIST directory for 'fashion-mnist:SPLIT'
  split: str = "train"             # IDX split of a directory
  preprocess: preprocess_lib.Preprocess = preprocess_lib.Preprocess()
  samples: int = 2000
  holdout: int = 500               # fewer (a fifth) when the data has too few samples

  def check(self) -> None:
    if not self.data:
      raise errors.UsageError("give the calibration data with --calibration_data")
    if self.samples < 1 or self.holdout < 0:
      raise errors.UsageError(f"--calibration_samples is {self.samples} and "
                              f"--calibration_holdout {self.holdout}; give at least 1 and 0")

  def load(self, fmt, graph) -> Samples:
    """The samples for the model seen as `graph` (a graph view) of format `fmt`."""
    self.check()
    if len(graph.inputs) != 1:
      raise errors.UsageError(f"calibration feeds one input; the model has "
                              f"{len(graph.inputs)} ({', '.join(graph.inputs)})")
    name = graph.inputs[0]
    shape = graph.shape(name)
    dtype = graph.dtypes.get(name, "float32")
    if not np.issubdtype(np.dtype(dtype), np.floating):
      raise errors.UsageError(f"the model's input '{name}' is {dtype}; calibration feeds "
                              "floating-point samples")
    source = sources.resolve(self.data, self.data_format, self.data_dir, self.split)
    examples = sources.examples(source, labels=False)
    got = examples.sample_shape
    if got is not None and self.preprocess.resize and len(got) == 3:
      got = tuple(self.preprocess.resize) + got[2:]
    layout = ""
    want = tuple(shape[1:]) if shape is not None else None
    if shape is not None and len(shape) == 4 and examples.images:
      layout = layout_lib.detect(fmt, graph, name, shape, got)
      want = layout_lib.image_shape(shape, layout)
    preprocess_lib.check(self.preprocess, want[-1] if want else None, examples.images)
    if got is not None and want is not None and not layout_lib.fits(got, want):
      raise errors.InputError(
          f"calibration data '{self.data}' gives samples of shape {_text(got)}, but the "
          f"model takes {_text(want)}" + ("; give --resize=H,W or images of the model's "
                                           "size and channels" if layout else ""))
    total = self.samples + self.holdout
    ds = preprocess_lib.batches(examples, self.preprocess, 256, want, max_samples=total)
    try:
      parts = [x for x, _ in ds.as_numpy_iterator()]
    except tf.errors.OpError as e:
      msg = (e.message.strip().splitlines() or [type(e).__name__])[0]
      raise errors.InputError(f"reading calibration data '{self.data}' failed: {msg}") from None
    if not parts:
      raise errors.InputError(f"calibration data '{self.data}' has no samples")
    x = np.concatenate(parts)
    bad = ~np.isfinite(x.reshape(len(x), -1)).all(axis=1)
    if bad.any():
      raise errors.InputError(f"calibration data '{self.data}' has NaN or infinite values "
                              f"(sample {int(np.flatnonzero(bad)[0])}, {int(bad.sum())} samples "
                              "in all); give finite inputs")
    holdout = self.holdout if len(x) >= total else min(self.holdout, len(x) // 5)
    x = layout_lib.to_model(x, layout, dtype) if layout else x.astype(dtype, copy=False)
    fit = x[:len(x) - holdout] if holdout else x
    return Samples(fit, x[len(fit):], self.data)


def _text(shape) -> str:
  return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"
