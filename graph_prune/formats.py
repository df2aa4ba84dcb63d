"""The model formats: one place that picks a format adapter and its op descriptions.

An adapter is a module with the functions of the `Adapter` protocol; it is the
only code that imports its framework. Each is imported only when its format is
used, so ONNX work never pays for importing TensorFlow.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Protocol, Sequence

from graph_prune.graph import view
from graph_prune.graph.edits import Edits
from graph_prune.ops import desc

TENSORFLOW = "tensorflow"
ONNX = "onnx"
TFLITE = "tflite"   # an output format: written, benchmarked and evaluated, never pruned


class Adapter(Protocol):
  """What every format adapter module provides (see adapters/tf_model.py, onnx_model.py)."""

  def load(self, path: str, signature: Optional[str] = None, inputs: Sequence[str] = (),
           outputs: Sequence[str] = ()) -> Any: ...
  def normalise(self, model: Any) -> Any: ...
  def to_view(self, model: Any) -> view.GraphView: ...
  def apply_edits(self, model: Any, edits: Edits) -> Any: ...
  def write(self, model: Any, path: str) -> None: ...
  # Runner(model) -> callable(feeds) -> outputs, with close(); raises errors.RunError.
  Runner: Any
  # Optional, together: RUNS_WITH_WEIGHTS = True where Runner(model, optimize=False,
  # arrays=...) feeds the floating-point weights from `arrays`, and
  # constants(model, tensors) -> iterator of (tensor, value) reads constants back.


@dataclasses.dataclass(frozen=True)
class Format:
  name: str                 # TENSORFLOW or ONNX
  adapter: Adapter
  ops: desc.Registry


def name_of(path: str) -> str:
  """The format of a model path: ONNX files end in .onnx, LiteRT ones in .tflite;
  anything else is TensorFlow (a .pb/.pbtxt GraphDef or a SavedModel directory)."""
  if path.endswith(".onnx"):
    return ONNX
  return TFLITE if path.endswith(".tflite") else TENSORFLOW


def for_path(path: str) -> Format:
  return for_name(name_of(path))


def for_name(name: str) -> Format:
  if name == ONNX:
    from graph_prune.adapters import onnx_model  # pylint: disable=g-import-not-at-top
    from graph_prune.ops import onnx_ops  # pylint: disable=g-import-not-at-top
    return Format(ONNX, onnx_model, onnx_ops.REGISTRY)
  if name == TFLITE:
    from graph_prune.adapters import tflite_model  # pylint: disable=g-import-not-at-top
    return Format(TFLITE, tflite_model, desc.Registry(TFLITE))
  from graph_prune.adapters import tf_model  # pylint: disable=g-import-not-at-top
  from graph_prune.ops import tf_ops  # pylint: disable=g-import-not-at-top
  return Format(TENSORFLOW, tf_model, tf_ops.REGISTRY)


@dataclasses.dataclass(frozen=True)
class ModelRef:
  """A model and which of its tensors to use: the one value prune, bench, evaluate,
  sweep and recovery load a model from. `signature` is a SavedModel's (default
  serving_default); `inputs`/`outputs` name tensors (default: the graph's own:
  placeholders and sinks, or the signature's)."""
  path: str
  signature: Optional[str] = None
  inputs: tuple[str, ...] = ()
  outputs: tuple[str, ...] = ()

  @property
  def format(self) -> Format:
    return for_path(self.path)

  def load(self) -> Any:
    """The model, read by its format's adapter (InputError/UsageError on bad input)."""
    return self.format.adapter.load(self.path, self.signature, tuple(self.inputs),
                                    tuple(self.outputs))
