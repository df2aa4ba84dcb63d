"""LiteRT (TensorFlow Lite) flatbuffers: an output format only. graph_prune does
not prune .tflite files; it writes them from a pruned TensorFlow model
(adapters/tf_to_tflite.py) and runs them -- for the quantization measurement,
//tools:bench and //tools:evaluate -- with the LiteRT interpreter of the
`ai-edge-litert` package (the pins in third_party/requirements.txt).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional, Sequence

import numpy as np

from graph_prune import errors
from graph_prune import files
from graph_prune.graph import view


@dataclasses.dataclass(frozen=True)
class TFLiteModel:
  content: bytes                                  # the flatbuffer
  inputs: tuple[str, ...]
  outputs: tuple[str, ...]
  shapes: tuple[tuple[int, ...], ...]             # per input, -1 where the size is free
  dtypes: tuple[str, ...]                         # per input, numpy names
  kind: str = "tflite"


def _interpreter(content: bytes, threads: Optional[int] = None):
  from ai_edge_litert import interpreter  # pylint: disable=g-import-not-at-top
  return interpreter.Interpreter(model_content=content, num_threads=threads)


def from_bytes(content: bytes, what: str = "the model") -> TFLiteModel:
  try:
    it = _interpreter(content)
  except (ValueError, RuntimeError) as e:
    raise errors.InputError(f"{what} is not a LiteRT model ({errors.first_line(e)})") from None
  ins, outs = it.get_input_details(), it.get_output_details()
  return TFLiteModel(content, tuple(d["name"] for d in ins), tuple(d["name"] for d in outs),
                     tuple(tuple(int(s) for s in d["shape_signature"]) for d in ins),
                     tuple(np.dtype(d["dtype"]).name for d in ins))


def load(path: str, signature: Optional[str] = None, inputs: Sequence[str] = (),
         outputs: Sequence[str] = ()) -> TFLiteModel:
  """Reads a .tflite file (never modifies it). All inputs are fed; `outputs` picks
  some of the model's outputs by name (default: all)."""
  if signature:
    raise errors.UsageError("--signature applies to SavedModel directories only")
  if not os.path.isfile(path):
    raise errors.InputError(f"input '{path}' does not exist; give a .tflite file")
  with open(path, "rb") as f:
    model = from_bytes(f.read(), f"'{path}'")
  if inputs and sorted(inputs) != sorted(model.inputs):
    raise errors.UsageError(f"a LiteRT model is fed all its inputs ({', '.join(model.inputs)})")
  for t in outputs:
    if t not in model.outputs:
      raise errors.UsageError(f"output '{t}' is not an output of '{path}'; it has "
                              f"{', '.join(model.outputs)}")
  return dataclasses.replace(model, outputs=tuple(outputs)) if outputs else model


def to_view(model: TFLiteModel) -> view.GraphView:
  """The inputs and outputs with their shapes and dtypes; no nodes (nothing here
  reads a LiteRT graph's operators). LiteRT is NHWC."""
  shapes = {n: (None,) + tuple(None if s < 0 else s for s in shape[1:])
            for n, shape in zip(model.inputs, model.shapes)}
  return view.GraphView([], {}, shapes, model.inputs, model.outputs, "NHWC",
                        dict(zip(model.inputs, model.dtypes)))


def write(model: TFLiteModel, path: str) -> None:
  parent = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(parent):
    raise errors.UsageError(f"output directory '{parent}' does not exist")
  files.write_atomic(path, model.content)


class Runner:
  """Runs the model in the LiteRT interpreter on the CPU: feeds in input order (the
  batch dimension resized to the feed's), fetches outputs."""

  def __init__(self, model: TFLiteModel, extra: Sequence[str] = (), options=None,
               optimize: bool = True, arrays=None, threads: Optional[int] = None):
    del options, optimize, arrays
    if extra:
      raise errors.UsageError("a LiteRT model's intermediate tensors cannot be fetched")
    self._it = _interpreter(model.content, threads)
    self._shapes: Optional[list[tuple[int, ...]]] = None
    by_name = {d["name"]: d["index"] for d in self._it.get_output_details()}
    self._fetch = [by_name[n] for n in model.outputs]
    self._feed = [(d["index"], d["dtype"]) for d in self._it.get_input_details()]

  def _fit(self, feeds: Sequence[np.ndarray]) -> None:
    shapes = [tuple(np.shape(x)) for x in feeds]
    if shapes == self._shapes:
      return
    for (index, _), shape in zip(self._feed, shapes):
      self._it.resize_tensor_input(index, list(shape), strict=False)
    self._it.allocate_tensors()
    self._shapes = shapes

  def __call__(self, feeds: Sequence[np.ndarray]) -> list[np.ndarray]:
    try:
      self._fit(feeds)
      for (index, dtype), x in zip(self._feed, feeds):
        self._it.set_tensor(index, np.asarray(x, dtype))
      self._it.invoke()
      return [self._it.get_tensor(i).copy() for i in self._fetch]
    except (ValueError, RuntimeError) as e:
      raise errors.RunError(f"LiteRT failed to run the model ({errors.first_line(e)})") from None

  def close(self) -> None:
    self._it = None
