"""How a model takes images: which layout its image input has, and the samples
(made [H, W, C] by graph_prune.data) brought to it. numpy only; the model is
seen through its graph view and its format's op descriptions."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from graph_prune import formats

NHWC, NCHW = "NHWC", "NCHW"

Shape = Optional[Sequence[Optional[int]]]


def image_shape(shape, layout: str):
  """One sample of an image input as the data makes it: [H, W, C]."""
  return (shape[2], shape[3], shape[1]) if layout == NCHW else tuple(shape[1:])


def fits(got, want) -> bool:
  """Shapes agree where both are known."""
  return len(got) == len(want) and all(w is None or g is None or g == w
                                       for g, w in zip(got, want))


def detect(fmt, view, name: str, shape, data_shape: Shape) -> str:
  """The layout of a rank-4 image input. The first reader of the input that says
  decides (a convolution by its channel axis; tf2onnx puts a Transpose 0,3,1,2
  behind an NHWC input); failing that, TensorFlow feeds NHWC; for ONNX the layout
  that the data's [H, W, C] fits, if only one does; failing that, the layout whose
  channel dimension is the smaller (NCHW, ONNX's own, on a tie)."""
  found = fmt.ops.input_layout(view, name)
  if found:
    return found
  if fmt.name in (formats.TENSORFLOW, formats.TFLITE):
    return NHWC
  if data_shape is not None and len(data_shape) == 3:
    fitting = [l for l in (NHWC, NCHW) if fits(data_shape, image_shape(shape, l))]
    if len(fitting) == 1:
      return fitting[0]
  big = float("inf")
  first, last = shape[1] or big, shape[3] or big
  return NHWC if last < first else NCHW


def to_model(batch: np.ndarray, layout: str, dtype: str) -> np.ndarray:
  """[N, H, W, C] samples in the model's layout and dtype."""
  if layout == NCHW:
    batch = batch.transpose(0, 3, 1, 2)
  return np.ascontiguousarray(batch.astype(dtype, copy=False))
