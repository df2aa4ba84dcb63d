"""Dropout at the classifier's input during recovery training.

A frozen graph has lost the dropout its model was trained with (Keras removes it at
inference), so training the pruned graph trains a network without that
regularisation. With --recover_dropout=P the training graph drops each input of
the layer that produces the logits (a MatMul, or a convolution classifier, behind
its bias) with probability P and scales the rest by 1 / (1 - P), where Keras
applications and the built-in model have their dropout. The mask is a stateless
function of a seed the training step feeds (the run's seed, the step, the
replica), so a resumed run draws the masks an uninterrupted one would have drawn.
Only the training graph has these nodes: the recovered model is the pruned graph
with the trained constants.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from graph_prune import errors
from graph_prune.adapters import tf_model
from graph_prune.graph import view

tf = tf_model.tf

_PREFIX = "graph_prune_dropout"
SEED = f"{_PREFIX}/seed:0"   # the training graph's extra input: int64[2]
_BIAS_OPS = ("BiasAdd", "Add", "AddV2")
_CLASSIFIER_OPS = ("MatMul", "Conv2D")


def _attr(**kw):
  return tf.compat.v1.AttrValue(**kw)


def classifier(graph: view.GraphView, logits: str) -> str:
  """The node of the layer that produces `logits` (through Identity nodes and its bias)."""
  node = graph.producer(graph.copied_from(logits)[-1])
  if node is not None and node.op in _BIAS_OPS:
    data = [i for i in node.inputs[:2] if not graph.is_const(i)]
    node = graph.producer(data[0]) if len(data) == 1 else None
  if (node is None or node.op not in _CLASSIFIER_OPS or len(node.inputs) < 2
      or not graph.is_const(node.inputs[1]) or node.attrs.get("transpose_a")):
    raise errors.UsageError(f"--recover_dropout: the logits '{logits}' do not come from a dense "
                            "or convolution layer with constant weights (and a bias); the "
                            "dropout goes at that layer's input")
  return node.name


def insert(model: tf_model.TFModel, logits: str,
           rate: float) -> tuple[tf_model.TFModel, str]:
  """The training graph with dropout at the classifier's input, which takes SEED as an
  extra input after the model's own, and the classifier's node name."""
  if not 0.0 < rate < 1.0:
    raise ValueError(f"dropout rate {rate} is not in (0, 1)")
  if any(n.name.startswith(_PREFIX) for n in model.graph_def.node):
    raise errors.InputError(f"the model already has nodes named {_PREFIX}/...")
  layer = classifier(tf_model.to_view(model), logits)
  gd = tf.compat.v1.GraphDef()
  gd.CopyFrom(model.graph_def)
  data = next(n for n in gd.node if n.name == layer).input[0]
  f32 = _attr(type=tf.float32.as_datatype_enum)

  def add(name, op, inputs, **attrs):
    node = gd.node.add(name=f"{_PREFIX}/{name}", op=op, input=list(inputs))
    for key, value in attrs.items():
      node.attr[key].CopyFrom(value)
    return node.name

  def const(name, value):
    t = tf.make_tensor_proto(value)
    return add(name, "Const", (), dtype=_attr(type=t.dtype), value=_attr(tensor=t))

  seed = add("seed", "Placeholder", (), dtype=_attr(type=tf.int64.as_datatype_enum),
             shape=_attr(shape=tf.TensorShape([2]).as_proto()))
  shape = add("shape", "Shape", (data,), T=f32, out_type=_attr(type=tf.int32.as_datatype_enum))
  uniform = add("uniform", "StatelessRandomUniform", (shape, seed), dtype=f32,
                T=_attr(type=tf.int32.as_datatype_enum),
                Tseed=_attr(type=tf.int64.as_datatype_enum))
  keep = add("keep", "GreaterEqual", (uniform, const("rate", np.float32(rate))), T=f32)
  mask = add("mask", "Cast", (keep,), SrcT=_attr(type=tf.bool.as_datatype_enum), DstT=f32,
             Truncate=_attr(b=False))
  kept = add("kept", "Mul", (data, mask), T=f32)
  out = add("out", "Mul", (kept, const("scale", np.float32(1.0 / (1.0 - rate)))), T=f32)
  for node in gd.node:
    if node.name == layer:
      node.input[0] = out
  return dataclasses.replace(model, graph_def=gd, inputs=tuple(model.inputs) + (SEED,)), layer
