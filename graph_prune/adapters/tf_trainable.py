"""A frozen TensorFlow graph made trainable: its weight constants become variables.

The graph itself is not rebuilt: it is imported into a tf.function with every
weight constant's output mapped to a variable's value, so the ops, their
attributes and their order are exactly those of the frozen graph (outputs are
bitwise those of the frozen graph before any training step). Writing back puts
each variable's value into its constant node through the adapter's own edit
path, so a round trip without training gives back the same GraphDef bytes.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from graph_prune.adapters import tf_model
from graph_prune.graph.edits import Edits

tf = tf_model.tf

# Ops whose input, not output, holds the logits.
_LOGITS_OPS = ("Softmax",)


def weight_constants(model: tf_model.TFModel) -> tuple[str, ...]:
  """Floating-point constants with more than one element: filters, dense matrices,
  biases and per-channel scales and shifts. Scalars (clip bounds, the 3 and 6 of
  hard-swish) stay constants: they are part of the op, not learnt."""
  names = []
  for node in model.graph_def.node:
    if node.op != "Const":
      continue
    dtype = tf.dtypes.as_dtype(node.attr["dtype"].type)
    if not dtype.is_floating:
      continue
    dims = node.attr["value"].tensor.tensor_shape.dim
    if dims and int(np.prod([d.size for d in dims])) >= 2:
      names.append(node.name + ":0")
  return tuple(names)


def logits_tensor(model: tf_model.TFModel, output: Optional[str] = None) -> str:
  """The tensor to distil on: the output, or the input of a Softmax that produces it
  (through Identity nodes; Keras applications end in softmax and soft targets need
  the logits)."""
  output = output or model.outputs[0]
  nodes = {n.name: n for n in model.graph_def.node}
  tensor = output
  while tensor.endswith(":0") and tensor.split(":")[0] in nodes:
    node = nodes[tensor.split(":")[0]]
    if node.op == "Identity":
      tensor = tf_model.tensor_name(node.input[0])
    elif node.op in _LOGITS_OPS:
      return tf_model.tensor_name(node.input[0])
    else:
      break
  return output


class Trainable(tf.Module):
  """The model's graph as a function of its inputs and of variables holding its weights.

  Create it under a tf.distribute strategy's scope to get mirrored variables.
  """

  def __init__(self, model: tf_model.TFModel, fetches: Sequence[str] = (),
               trainable: Optional[Sequence[str]] = None):
    super().__init__(name="trainable_graph")
    self._model = model
    self._graph_def = tf_model.rename_functions(model.graph_def)
    self.fetches = tuple(fetches) or tuple(model.outputs)
    self.weight_names = tuple(trainable) if trainable is not None else weight_constants(model)
    values = constant_values(model.graph_def, self.weight_names)
    self.weights = [tf.Variable(values[n], name=_variable_name(n)) for n in self.weight_names]
    self._functions = _Functions()

  def __call__(self, *inputs, fetches: Optional[Sequence[str]] = None):
    """The fetched tensors (the model's outputs by default) for `inputs` in the
    model's input order."""
    fetches = tuple(fetches or self.fetches)
    fn = self._functions.by_fetches.get(fetches)
    if fn is None:
      # A tf.function of its own: ops that import_graph_def creates are not seen by
      # a GradientTape, but a call of a function is, and differentiates through it.
      fn = tf.function(functools.partial(self._forward, fetches=fetches))
      self._functions.by_fetches[fetches] = fn
    return fn(*inputs)

  def _forward(self, *inputs, fetches):
    input_map = {name: w.read_value() for name, w in zip(self.weight_names, self.weights)}
    input_map.update(zip(self._model.inputs, inputs))
    return tf.graph_util.import_graph_def(
        self._graph_def, input_map=input_map, return_elements=list(fetches), name="graph")

  def values(self, names: Optional[Sequence[str]] = None) -> dict[str, np.ndarray]:
    """The variables' values by constant name: all, or those `names` (each one of
    the trained constants)."""
    by_name = self._by_name()
    return {n: by_name[n].numpy() for n in (self.weight_names if names is None else names)}

  def assign(self, values: Mapping[str, np.ndarray]) -> None:
    by_name = self._by_name()
    for name, value in values.items():
      by_name[name].assign(value)

  def _by_name(self) -> dict[str, Any]:
    """The variables by constant name."""
    return dict(zip(self.weight_names, self.weights))

  def model(self) -> tf_model.TFModel:
    """The frozen model with the variables' current values in its constants."""
    return with_values(self._model, self.values())


def with_values(model: tf_model.TFModel, values: Mapping[str, np.ndarray]) -> tf_model.TFModel:
  """A copy of the model whose named constants hold `values` (same shapes)."""
  old = constant_values(model.graph_def, values.keys())
  for name, value in values.items():
    if old[name].shape != np.shape(value):
      raise ValueError(f"constant {name} has shape {old[name].shape}, not {np.shape(value)}")
  return tf_model.apply_edits(model, Edits(constants=dict(values), new_constants={}, rewires=()))


class _Functions:
  """The traced functions by fetch list; a plain object, so tf.Module does not track it."""

  def __init__(self):
    self.by_fetches = {}


def constant_values(model_or_graph_def, names) -> dict[str, np.ndarray]:
  """The values of the named constants (tensor names) of a model or GraphDef."""
  graph_def = getattr(model_or_graph_def, "graph_def", model_or_graph_def)
  wanted = {n.split(":")[0]: n for n in names}
  out = {}
  for node in graph_def.node:
    if node.name in wanted:
      out[wanted[node.name]] = tf.make_ndarray(node.attr["value"].tensor)
  missing = set(wanted.values()) - set(out)
  if missing:
    raise ValueError(f"no constant node for {sorted(missing)[:3]}")
  return out


def _variable_name(tensor: str) -> str:
  return tensor.split(":")[0].replace("/", "__")
