"""A TensorFlow graph in half precision for XLA: bfloat16 (the TPU's native type)
or float16, weights and compute, with float32 inputs and outputs.

The graph keeps its input placeholders (float32) and its output tensor names: a
Cast to the low type follows every float input, and every float output node is
renamed and followed by a Cast back to float32 under the output's own name, so
callers and SavedModel signatures see the same tensors as before. Every float32
weight is stored in the low type, which halves the file. Batch-norm statistics
(FusedBatchNorm's U) stay float32, as TensorFlow requires. CPU kernels for these
types are incomplete without oneDNN; XLA compiles them everywhere, so graph_prune
runs such graphs under XLA (tf_model.Runner).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from graph_prune import errors
from graph_prune.adapters import tf_model

TYPES = {"bfloat16": tf.bfloat16, "float16": tf.float16}

_FLOAT = tf.float32.as_datatype_enum
_BATCH_NORMS = ("FusedBatchNorm", "FusedBatchNormV2", "FusedBatchNormV3")


def _split(tensor: str) -> tuple[str, int]:
  name, _, index = tf_model.tensor_name(tensor).rpartition(":")
  return name, int(index)


def cast(model: tf_model.TFModel, scheme: str) -> tf_model.TFModel:
  """The model computing in TYPES[scheme], float32 at its inputs and outputs."""
  low = TYPES[scheme].as_datatype_enum
  src = model.graph_def
  if src.library.function:
    raise errors.UsageError(f"--quantize={scheme}: the graph calls library functions "
                            f"({src.library.function[0].signature.name}), which are not cast; "
                            "give --out_format=onnx or tflite")
  nodes = {n.name: n for n in src.node}
  inputs = {_split(t)[0] for t in model.inputs}
  outputs = {}
  for t in model.outputs:
    name, index = _split(t)
    node = nodes[name]
    if name in inputs or _output_type(node) != _FLOAT:
      continue
    if index:
      raise errors.UsageError(f"--quantize={scheme}: output '{t}' is not the first output of "
                              "its node, so it cannot keep its name behind a cast to float32")
    outputs[name] = f"{name}/gp_{scheme}"
  casts = {name: f"{name}/gp_{scheme}" for name in sorted(inputs)
           if _output_type(nodes[name]) == _FLOAT}
  # Batch-norm statistics and their constants stay float32.
  keep_float = {_split(t)[0] for n in src.node if n.op in _BATCH_NORMS for t in n.input[1:5]}
  out = tf.compat.v1.GraphDef()
  out.versions.CopyFrom(src.versions)
  for node in src.node:
    new = out.node.add()
    new.CopyFrom(node)
    if node.name in outputs:
      new.name = outputs[node.name]
    del new.input[:]
    for t in node.input:
      new.input.append(_reader_input(t, casts, outputs))
    if node.name in inputs:
      continue
    if node.op == "Const" and node.attr["dtype"].type == _FLOAT:
      if node.name not in keep_float:
        value = tf.make_ndarray(node.attr["value"].tensor)
        new.attr["dtype"].type = low
        new.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(
            value.astype(np.float32), dtype=TYPES[scheme]))
      continue
    for key, attr in new.attr.items():
      if node.op in _BATCH_NORMS and key == "U":
        continue
      if attr.type == _FLOAT:
        attr.type = low
      if any(t == _FLOAT for t in attr.list.type):
        types = [low if t == _FLOAT else t for t in attr.list.type]
        del attr.list.type[:]
        attr.list.type.extend(types)
  for name, cast_name in casts.items():
    _add_cast(out, cast_name, f"{name}:0", _FLOAT, low)
  for name, renamed in outputs.items():
    _add_cast(out, name, f"{renamed}:0", low, _FLOAT)
  return tf_model.TFModel(model.kind, out, model.inputs, model.outputs, model.signature)


def _output_type(node) -> int:
  for key in ("dtype", "T", "DstT"):
    if key in node.attr and node.attr[key].type:
      return node.attr[key].type
  return 0


def _reader_input(t: str, casts: dict, renamed: dict) -> str:
  """Input `t` of a node, as it reads in the cast graph: a float input placeholder
  through its cast, a renamed output node under its new name."""
  control = t.startswith("^")
  name, _, index = t.lstrip("^").partition(":")
  if not control and name in casts and index in ("", "0"):
    return casts[name]
  name = renamed.get(name, name)
  return ("^" if control else "") + name + (f":{index}" if index else "")


def _add_cast(graph_def, name: str, src: str, from_type: int, to_type: int) -> None:
  node = graph_def.node.add()
  node.name, node.op = name, "Cast"
  node.input.append(src)
  node.attr["SrcT"].type = from_type
  node.attr["DstT"].type = to_type
  node.attr["Truncate"].b = False
