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

from typing import Optional

import numpy as np

from graph_prune import errors
from graph_prune.adapters import tf_model
from graph_prune.graph import view

tf = tf_model.tf

_PREFIX = "graph_prune_dropout"
SEED = f"{_PREFIX}/seed:0"   # the training graph's extra input: int64[2]
_BIAS_OPS = ("BiasAdd", "Add", "AddV2")
_CLASSIFIER_OPS = ("MatMul", "Conv2D")


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


def insert(model: tf_model.TFModel, logits: str, rate: float,
           graph: Optional[view.GraphView] = None) -> tuple[tf_model.TFModel, str]:
  """The training graph with dropout at the classifier's input, which takes SEED as an
  extra input after the model's own, and the classifier's node name. `graph`: the
  model's view, when the caller has it (the classifier is found on it)."""
  if not 0.0 < rate < 1.0:
    raise ValueError(f"dropout rate {rate} is not in (0, 1)")
  w = tf_model.NodeWriter(model, _PREFIX)
  layer = classifier(graph or tf_model.to_view(model), logits)
  reader = next(n for n in w.graph_def.node if n.name == layer)
  data = reader.input[0]
  f32, i32, i64 = tf_model.FLOAT32, tf_model.INT32, tf_model.INT64
  seed = w.add("seed", "Placeholder", dtype=i64,
               shape=tf_model.attr(shape=tf.TensorShape([2]).as_proto()))
  shape = w.add("shape", "Shape", (data,), T=f32, out_type=i32)
  uniform = w.add("uniform", "StatelessRandomUniform", (shape, seed), dtype=f32, T=i32,
                  Tseed=i64)
  keep = w.add("keep", "GreaterEqual", (uniform, w.const("rate", np.float32(rate))), T=f32)
  mask = w.add("mask", "Cast", (keep,), SrcT=tf_model.attr(type=tf.bool.as_datatype_enum),
               DstT=f32, Truncate=tf_model.attr(b=False))
  kept = w.add("kept", "Mul", (data, mask), T=f32)
  out = w.add("out", "Mul", (kept, w.const("scale", np.float32(1.0 / (1.0 - rate)))), T=f32)
  reader.input[0] = out
  return w.model((SEED,)), layer
