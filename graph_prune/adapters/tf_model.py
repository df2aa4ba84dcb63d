"""TensorFlow adapter: the only place (with tf_run) that imports TensorFlow.

Reads a frozen GraphDef (.pb binary, .pbtxt text) or a SavedModel signature
(frozen on load), normalises it with grappler's own constant folding, builds
the graph view, writes constant edits back into a copy of the GraphDef, and
writes the result atomically in the input's format.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import shutil
import tempfile
from typing import Iterator, Mapping, Optional, Sequence

import numpy as np

from graph_prune import errors
from graph_prune import files
from graph_prune.graph import arrays as arrays_lib
from graph_prune.graph import view
from graph_prune.graph.edits import Edits

# Quiet TensorFlow's C++ start-up chatter before it is imported.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import tensorflow as tf  # pylint: disable=g-import-not-at-top
from google.protobuf import message as pb_message  # pylint: disable=g-import-not-at-top
from google.protobuf import text_format  # pylint: disable=g-import-not-at-top
from tensorflow.core.protobuf import config_pb2  # pylint: disable=g-import-not-at-top
from tensorflow.python.framework import convert_to_constants  # pylint: disable=g-import-not-at-top
from tensorflow.python.grappler import tf_optimizer  # pylint: disable=g-import-not-at-top

# The Runner can run a model with other values for its large weights (`arrays`):
# the oracle runs the masked original so, without copying the model.
RUNS_WITH_WEIGHTS = True

GRAPHDEF = "graphdef"
GRAPHDEF_TEXT = "graphdef_text"
SAVED_MODEL = "saved_model"


@dataclasses.dataclass(frozen=True)
class Signature:
  """A SavedModel signature: its key, and key -> tensor name for inputs and outputs."""
  name: str
  inputs: tuple[tuple[str, str], ...]
  outputs: tuple[tuple[str, str], ...]


@dataclasses.dataclass(frozen=True)
class TFModel:
  kind: str
  graph_def: tf.compat.v1.GraphDef
  inputs: tuple[str, ...]
  outputs: tuple[str, ...]
  signature: Optional[Signature] = None


def tensor_name(name: str) -> str:
  name = name.lstrip("^")
  return name if ":" in name else name + ":0"


def _node_name(tensor: str) -> str:
  return tensor.lstrip("^").split(":")[0]


def _parse_graph_def(path: str) -> tuple[tf.compat.v1.GraphDef, str]:
  with open(path, "rb") as f:
    data = f.read()
  gd = tf.compat.v1.GraphDef()
  kind = GRAPHDEF
  try:
    if path.endswith(".pbtxt"):
      text_format.Parse(data.decode("utf-8"), gd)
      kind = GRAPHDEF_TEXT
    else:
      gd.ParseFromString(data)
  except (pb_message.DecodeError, text_format.ParseError, UnicodeDecodeError, RuntimeWarning) as e:
    raise errors.InputError(f"'{path}' is not a TensorFlow GraphDef ({str(e).splitlines()[0]}); "
                            "give a frozen .pb/.pbtxt or a SavedModel directory") from None
  if not gd.node:
    raise errors.InputError(f"'{path}' holds no graph nodes; give a frozen .pb/.pbtxt or a "
                            "SavedModel directory")
  _check_constants(gd, path)
  _check_imports(gd, f"'{path}' is not a valid TensorFlow graph")
  return gd, kind


def _check_imports(gd: tf.compat.v1.GraphDef, what: str) -> None:
  """TensorFlow's import (op definitions, attributes, shapes) of the graph without
  its large weights; InputError "<what> (<TensorFlow's reason>)" where it fails."""
  try:
    with tf.Graph().as_default():
      tf.compat.v1.import_graph_def(_light(gd)[0], name="")
  except (ValueError, TypeError, tf.errors.OpError) as e:
    raise errors.InputError(f"{what} ({str(e).splitlines()[0][:200]})") from None


def _check_constants(gd: tf.compat.v1.GraphDef, path: str) -> None:
  """Every Const holds as many values as its shape says (TensorFlow's importer
  does not look; grappler and the runtime fail on them later, noisily)."""
  for node in gd.node:
    if node.op != "Const" or "value" not in node.attr:
      continue
    t = node.attr["value"].tensor
    try:
      dtype = tf.dtypes.as_dtype(t.dtype)
    except TypeError:
      raise errors.InputError(f"'{path}': constant '{node.name}' has an unknown dtype "
                              f"({t.dtype})") from None
    if dtype == tf.string or not dtype.is_numpy_compatible:
      continue
    count = 1
    for d in t.tensor_shape.dim:
      count *= max(d.size, 0)
    packed = len(t.tensor_content)  # (one copy of the bytes; ListFields would copy them too)
    if packed:
      ok = packed == count * dtype.size
    else:
      ok = all(len(getattr(t, f.name)) in (0, 1, count) for f in t.DESCRIPTOR.fields
               if f.name.endswith("_val") and f.label == f.LABEL_REPEATED)
    if not ok or any(d.size < 0 for d in t.tensor_shape.dim):
      raise errors.InputError(f"'{path}': constant '{node.name}' does not hold the "
                              f"{count} values its shape says; the file is corrupt")


def _default_io(gd: tf.compat.v1.GraphDef) -> tuple[list[str], list[str]]:
  consumed = set()
  for n in gd.node:
    for i in n.input:
      consumed.add(_node_name(i))
  inputs = [tensor_name(n.name) for n in gd.node if n.op == "Placeholder"]
  skip = {"Const", "NoOp", "Placeholder", "Assert", "SaveV2", "RestoreV2"}
  outputs = [tensor_name(n.name) for n in gd.node if n.name not in consumed and n.op not in skip]
  return inputs, outputs


def _check_names(gd, tensors: Sequence[str], what: str) -> None:
  names = {n.name for n in gd.node}
  for t in tensors:
    if _node_name(t) not in names:
      raise errors.UsageError(f"{what} '{t}' is not a node of the graph; check --{what}s")


def load(path: str, signature: Optional[str] = None, inputs: Sequence[str] = (),
         outputs: Sequence[str] = ()) -> TFModel:
  """Reads a GraphDef file or a SavedModel directory; never modifies it."""
  if not os.path.exists(path):
    raise errors.InputError(f"input '{path}' does not exist; give a .pb/.pbtxt GraphDef or a "
                            "SavedModel directory")
  if os.path.isdir(path):
    if not (os.path.exists(os.path.join(path, "saved_model.pb")) or
            os.path.exists(os.path.join(path, "saved_model.pbtxt"))):
      raise errors.InputError(f"directory '{path}' has no saved_model.pb; give a SavedModel "
                              "directory or a .pb file")
    return _load_saved_model(path, signature or "serving_default")
  if signature:
    raise errors.UsageError("--signature applies to SavedModel directories only")
  gd, kind = _parse_graph_def(path)
  found_in, found_out = _default_io(gd)
  ins = tuple(tensor_name(t) for t in inputs) or tuple(found_in)
  outs = tuple(tensor_name(t) for t in outputs) or tuple(found_out)
  _check_names(gd, ins, "input")
  _check_names(gd, outs, "output")
  if not ins or not outs:
    raise errors.InputError(f"'{path}' has no {'inputs' if not ins else 'outputs'} to find; "
                            "name them with --inputs/--outputs")
  return TFModel(kind, gd, ins, outs)


def _load_saved_model(path: str, signature: str) -> TFModel:
  try:
    loaded = tf.saved_model.load(path)
  except Exception as e:  # TensorFlow raises many types for a bad SavedModel.
    raise errors.InputError(f"'{path}' is not a readable SavedModel "
                            f"({str(e).splitlines()[0][:200]})") from None
  sigs = dict(loaded.signatures)
  if signature not in sigs:
    raise errors.UsageError(f"SavedModel '{path}' has no signature '{signature}'; it has: "
                            f"{', '.join(sorted(sigs)) or 'none'}")
  fn = sigs[signature]
  if _variable_bytes(fn) < _PROTO_LIMIT:
    frozen = convert_to_constants.convert_variables_to_constants_v2(fn)
    gd = frozen.graph.as_graph_def()
    inputs, outputs = frozen.inputs, [t.name for t in frozen.outputs]
  else:
    gd, inputs, outputs = _freeze_large(fn)
  specs = fn.structured_input_signature[1]
  placeholders = {t.op.name: t.name for t in inputs}
  ins = []
  for key in sorted(specs):
    name = specs[key].name or key
    tensor = placeholders.get(name) or placeholders.get(key)
    if tensor is None:
      raise errors.InputError(f"signature input '{key}' of '{path}' has no placeholder")
    ins.append((key, tensor))
  # Frozen outputs follow the flattened (key-sorted) order of the signature's outputs.
  keys = sorted(fn.structured_outputs)
  if len(keys) != len(outputs):
    raise errors.InputError(f"signature '{signature}' of '{path}' has nested outputs; only "
                            "flat dicts of tensors are supported")
  outs = list(zip(keys, outputs))
  sig = Signature(signature, tuple(ins), tuple(outs))
  return TFModel(SAVED_MODEL, gd, tuple(t for _, t in ins), tuple(t for _, t in outs), sig)


# Protobuf serialises no message of 2 GiB or more; the graph itself needs some room.
_PROTO_LIMIT = 2**31 - 2**26


def _variable_bytes(fn) -> int:
  """The bytes of the variables a concrete function captures."""
  return sum(v.shape.num_elements() * v.dtype.size for v in fn.graph.variables
             if v.shape.is_fully_defined())


def _freeze_large(fn):
  """The function with its variables made constants, for variables of protobuf's
  2 GiB or more: TensorFlow's converter checks its result by importing it whole into
  a graph, which such a GraphDef cannot pass (it is serialised on the way), so the
  GraphDef is taken from the conversion itself and never serialised whole; this
  package hands TensorFlow only graphs without the large weights (_light). Returns
  the GraphDef, the input placeholders (as tensors with .op.name and .name) and the
  output tensor names."""
  from tensorflow.python.framework import convert_to_constants as c2c  # pylint: disable=g-import-not-at-top
  try:
    data = c2c._FunctionConverterDataInEager(  # pylint: disable=protected-access
        func=fn, lower_control_flow=True, aggressive_inlining=False)
    gd, _ = c2c._replace_variables_by_constants(converter_data=data)  # pylint: disable=protected-access
  except AttributeError:
    raise errors.InputError("this TensorFlow cannot freeze a SavedModel of 2 GiB or more "
                            "of variables without serialising it") from None
  names = {n.name for n in gd.node}
  inputs = [t for t in fn.inputs if t.dtype != tf.resource and t.op.name in names]
  outputs = [t.name for t in fn.outputs]
  for t in outputs:
    if _node_name(t) not in names:
      raise errors.InputError(f"freezing the SavedModel lost its output '{t}'")
  _check_imports(gd, "the frozen SavedModel is not a valid graph")
  return gd, inputs, outputs


# Weights of at least this many elements are left out of the graphs that grappler,
# shape inference and import validation see (each would copy them).
_LIGHT_ELEMENTS = 1 << 14
# Ops that read a weight without computing anything from its values that constant
# folding could use: a weight read only by these stays out of grappler's sight.
_WEIGHT_SLOTS = {"Conv2D": 1, "Conv3D": 1, "DepthwiseConv2dNative": 1, "MatMul": 1,
                 "Conv2DBackpropInput": 1, "Einsum": 1, "PartitionedCall": None,
                 "StatefulPartitionedCall": None}


def _light(graph_def: tf.compat.v1.GraphDef, also: frozenset = frozenset()
           ) -> tuple[tf.compat.v1.GraphDef, dict]:
  """A copy of the graph in which every large constant that only linear layers
  read as their weight (directly or through Identity) is a Placeholder of its
  dtype and shape; and those constants' NodeDefs by name (not copied). Grappler,
  shape inference and import treat the placeholders like inputs. Weights that
  grappler could fold a constant factor into (a batch-norm scale after the layer)
  stay constants, so the result is the same as on the full graph, without copying
  the other weights each time. Constants named in `also` become placeholders
  whatever they are (a runner that feeds them)."""
  readers: dict[str, list] = {}
  for node in graph_def.node:
    for i, t in enumerate(node.input):
      if not t.startswith("^"):   # a control edge reads no value
        readers.setdefault(_node_name(t), []).append((node, i))

  producers = {n.name: n for n in graph_def.node}

  def scaled(node) -> bool:
    """Whether grappler may fold a constant factor into this layer's weight: its
    output read by a Mul (MulConvPushDown), or its input a Mul's output."""
    if any(r.op == "Mul" for r, _ in readers.get(node.name, ())):
      return True
    source = producers.get(_node_name(node.input[0])) if node.input else None
    return source is not None and source.op == "Mul"

  def weight_only(name, depth=0):
    for node, i in readers.get(name, ()):
      if node.op == "Identity" and depth < 4:
        if not weight_only(node.name, depth + 1):
          return False
        continue
      slot = _WEIGHT_SLOTS.get(node.op, -1)
      if slot == -1 or (slot is not None and i != slot) or scaled(node):
        return False
    return bool(readers.get(name))

  heavy = {}
  for node in graph_def.node:
    if node.op != "Const" or "value" not in node.attr or node.input:
      continue   # (a constant with a control input lives in a while loop's frame)
    if node.name in also:
      heavy[node.name] = node
      continue
    shape = node.attr["value"].tensor.tensor_shape
    if shape.unknown_rank or math.prod(max(d.size, 0) for d in shape.dim) < _LIGHT_ELEMENTS:
      continue
    if weight_only(node.name):
      heavy[node.name] = node
  if not heavy:
    return graph_def, {}
  light = tf.compat.v1.GraphDef()
  for field in ("versions", "library"):
    if graph_def.HasField(field):
      getattr(light, field).CopyFrom(getattr(graph_def, field))
  for node in graph_def.node:
    if node.name in heavy:
      ph = light.node.add(name=node.name, op="Placeholder", device=node.device)
      ph.attr["dtype"].type = node.attr["dtype"].type
      ph.attr["shape"].shape.CopyFrom(node.attr["value"].tensor.tensor_shape)
    else:
      light.node.add().CopyFrom(node)
  return light, heavy


def weights_as_feeds(graph_def: tf.compat.v1.GraphDef
                     ) -> tuple[tf.compat.v1.GraphDef, list[str], list[np.ndarray]]:
  """The graph with its large linear-layer weights as placeholders (as _light
  makes them), their tensor names, and the weights as arrays, for a runner that
  feeds them: XLA then compiles no weight into the executable it keeps."""
  light, heavy = _light(graph_def)
  return (light, [f"{name}:0" for name in heavy],
          [tf.make_ndarray(node.attr["value"].tensor) for node in heavy.values()])


def _restore(light: tf.compat.v1.GraphDef, heavy: dict) -> tf.compat.v1.GraphDef:
  """The light graph with its placeholders swapped back for the constants."""
  if not heavy:
    return light
  out = tf.compat.v1.GraphDef()
  for field in ("versions", "library"):
    if light.HasField(field):
      getattr(out, field).CopyFrom(getattr(light, field))
  for node in light.node:
    if node.name in heavy and node.op == "Placeholder":
      out.node.add().CopyFrom(heavy[node.name])
    else:
      out.node.add().CopyFrom(node)
  return out


# The axis of a layer's weight that is the layer's input channels (or features): the
# output shape does not depend on it; MatMul's is 1 with transpose_b.
_IN_AXIS = {"Conv2D": 2, "Conv3D": 3, "DepthwiseConv2dNative": 2, "MatMul": 0,
            "Conv2DBackpropInput": 3}


def _small_fake_inputs(light: tf.compat.v1.GraphDef, heavy: dict) -> None:
  """Grappler gives every Placeholder of the graph it optimises a filled tensor of
  the placeholder's shape (grappler_item_builder.cc), so the weights that _light
  turned into placeholders would each be allocated once more, and with oneDNN the
  CPU allocator keeps that memory for the life of the process (about the size of
  the weights, measured on VGG16). Here each such placeholder's input-channel axis
  becomes unknown: grappler then allocates it with that axis 1, while every layer's
  output shape, and so what constant folding sees, stays the same (only the
  layer's check of its input channels against the weight is left out). Placeholders
  read by anything else, or by layers that disagree on the axis, keep their shape."""
  if not heavy:
    return
  readers: dict[str, list] = {}
  for node in light.node:
    for t in node.input:
      if not t.startswith("^"):
        readers.setdefault(_node_name(t), []).append(node)

  def axes(name, depth=0):
    found = set()
    for node in readers.get(name, ()):
      if node.op == "Identity" and depth < 4:
        found |= axes(node.name, depth + 1)
      elif node.op in _IN_AXIS:
        transposed = node.op == "MatMul" and node.attr["transpose_b"].b
        found.add(1 if transposed else _IN_AXIS[node.op])
      else:
        found.add(None)
    return found

  for node in light.node:
    if node.name in heavy and node.op == "Placeholder":
      found = axes(node.name)
      dims = node.attr["shape"].shape.dim
      if len(found) == 1 and None not in found and next(iter(found)) < len(dims):
        dims[next(iter(found))].size = -1


def normalise(model: TFModel) -> TFModel:
  """Grappler constant folding: Identity chains, decomposed batch-norm, Reshape(Const)
  become per-channel constants the analysis can slice. Large weights stay out of
  grappler's copy of the graph (see _light)."""
  light, heavy = _light(model.graph_def)
  _small_fake_inputs(light, heavy)
  graph = tf.Graph()
  with graph.as_default():
    tf.compat.v1.import_graph_def(light, name="")
  meta = tf.compat.v1.train.export_meta_graph(graph_def=light, graph=graph)
  fetch = meta.collection_def["train_op"]
  for t in model.outputs:
    fetch.node_list.value.append(_node_name(t))
  config = config_pb2.ConfigProto()
  rewrite = config.graph_options.rewrite_options
  rewrite.optimizers.extend(["constfold", "dependency"])
  rewrite.min_graph_nodes = -1
  rewrite.meta_optimizer_iterations = 2  # rewriter_config ONE=1, TWO=2
  out = _restore(tf_optimizer.OptimizeGraph(config, meta), heavy)
  names = {n.name for n in out.node}
  for t in model.inputs + model.outputs:
    if _node_name(t) not in names:
      raise errors.InputError(f"normalisation removed '{t}'; is it connected to the outputs?")
  return dataclasses.replace(model, graph_def=out)


def _attrs(node_def) -> dict:
  out = {}
  for key, v in node_def.attr.items():
    kind = v.WhichOneof("value")
    if kind == "s":
      out[key] = v.s.decode("utf-8", "replace")
    elif kind in ("i", "f", "b"):
      out[key] = getattr(v, kind)
    elif kind == "list" and (v.list.i or not v.list.ListFields()):
      out[key] = tuple(v.list.i)
    elif kind == "type":
      out[key] = tf.dtypes.as_dtype(v.type).name
  return out


def to_view(model: TFModel) -> view.GraphView:
  """The graph view; importing the graph runs TensorFlow's shape inference, which
  also validates it (a broken rewrite raises ValueError here)."""
  graph_def, inputs, outputs = model.graph_def, model.inputs, model.outputs
  light, heavy = _light(graph_def)
  graph = tf.Graph()
  with graph.as_default():
    tf.compat.v1.import_graph_def(light, name="")
  node_defs = {n.name: n for n in graph_def.node}
  functions = {f.signature.name: f for f in graph_def.library.function}
  ops = graph.get_operations()
  nodes, constants, shapes, dtypes = [], {}, {}, {}
  layout = "NHWC"
  for op in ops:
    attrs = _attrs(node_defs[op.name])
    kind, reads = ("Const" if op.name in heavy else op.type), tuple(t.name for t in op.inputs)
    inner = _call_as_op(node_defs[op.name], functions) if op.type in _CALLS else None
    if inner is not None:
      # Seen as the convolution it calls; its weights are outside, edited as usual.
      kind, attrs, order = inner
      reads = tuple(reads[i] for i in order)
    if attrs.get("data_format", "").startswith("NC"):
      layout = "NCHW"
    nodes.append(view.Node(op.name, kind, reads, tuple(t.name for t in op.outputs), attrs))
    for t in op.outputs:
      shapes[t.name] = None if t.shape.rank is None else tuple(t.shape.as_list())
      if t.dtype.is_numpy_compatible:
        dtypes[t.name] = t.dtype.as_numpy_dtype.__name__
    if kind == "Const":
      try:
        constants[op.outputs[0].name] = _aligned_value(node_defs[op.name].attr["value"].tensor)
      except (ValueError, TypeError) as e:
        raise errors.InputError(f"constant '{op.name}' cannot be read ({_first_line(e)}); the "
                                "model is corrupt") from None
  return view.GraphView(_topological(_mark_loops(nodes)), constants, shapes, inputs, outputs,
                        layout, dtypes)


def _aligned_value(tensor) -> np.ndarray:
  """A Const's value, aligned (graph/arrays.py); packed values are copied once,
  straight from the proto's bytes."""
  return arrays_lib.aligned(_value(tensor))


def _value(tensor) -> np.ndarray:
  """A TensorProto's value; packed values as a read-only view of the proto's bytes
  (one copy of them, where make_ndarray makes two)."""
  dtype = tf.dtypes.as_dtype(tensor.dtype)
  if tensor.tensor_content and dtype.is_numpy_compatible and dtype != tf.string:
    shape = [d.size for d in tensor.tensor_shape.dim]
    flat = np.frombuffer(tensor.tensor_content, dtype.as_numpy_dtype)
    if flat.size == math.prod(shape):
      return flat.reshape(shape)
  return tf.make_ndarray(tensor)


def constants(model: TFModel, tensors) -> Iterator[tuple[str, np.ndarray]]:
  """(tensor, value) for the model's Const tensors named in `tensors` (name:0 each),
  decoded one at a time as they are taken (_value)."""
  wanted = {_node_name(t): t for t in tensors}
  for n in model.graph_def.node:
    if n.name in wanted and n.op == "Const":
      yield wanted[n.name], _value(n.attr["value"].tensor)


_CALLS = ("PartitionedCall", "StatefulPartitionedCall")
_INLINE = ("Conv2D", "Conv3D", "DepthwiseConv2dNative")


def _call_as_op(node_def, functions) -> Optional[tuple[str, dict, tuple[int, ...]]]:
  """For a call of a function whose body is one convolution of its arguments (Keras
  writes grouped convolution so, to have XLA compile it): the convolution's op
  type, its attributes, and the call input that feeds each of its inputs."""
  f = functions.get(node_def.attr["f"].func.name) if "f" in node_def.attr else None
  if f is None:
    return None
  args = {a.name: i for i, a in enumerate(f.signature.input_arg)}
  through = {n.name: n.input[0] for n in f.node_def if n.op == "Identity" and n.input}
  body = [n for n in f.node_def if n.op not in ("NoOp", "Identity")]
  if len(body) != 1 or body[0].op not in _INLINE or len(f.signature.output_arg) != 1:
    return None

  def source(name: str) -> str:
    name = name.lstrip("^").split(":")[0]
    while name in through:
      name = through[name].split(":")[0]
    return name

  order = tuple(args.get(source(t)) for t in body[0].input if not t.startswith("^"))
  if None in order or source(f.ret[f.signature.output_arg[0].name]) != body[0].name:
    return None
  return body[0].op, _attrs(body[0]), order


def _mark_loops(nodes: list[view.Node]) -> list[view.Node]:
  """Marks the nodes of while-loop bodies (TensorFlow 1 control flow, which frozen
  TF 2 loops and LSTMs are lowered to): everything reachable from an Enter node
  without leaving through an Exit."""
  readers: dict[str, list[view.Node]] = {}
  for n in nodes:
    for t in n.inputs:
      readers.setdefault(_node_name(t), []).append(n)
  frame: dict[str, str] = {}
  stack = [(n, n.attrs.get("frame_name", n.name)) for n in nodes if n.op in _ENTER]
  while stack:
    n, name = stack.pop()
    if n.name in frame:
      continue
    frame[n.name] = name
    if n.op in _EXIT:
      continue
    stack.extend((r, name) for r in readers.get(n.name, ()) if r.name not in frame)
  if not frame:
    return nodes
  return [dataclasses.replace(n, loop=frame[n.name]) if n.name in frame else n for n in nodes]


_ENTER = ("Enter", "RefEnter")
_EXIT = ("Exit", "RefExit")
_NEXT = ("NextIteration", "RefNextIteration")


def _topological(nodes: list[view.Node]) -> list[view.Node]:
  """Nodes in topological order. The back edges of while loops (NextIteration into
  Merge) are the only cycles allowed: they are left out of the ordering."""
  producer = {t: n.name for n in nodes for t in n.outputs}
  back = {n.name for n in nodes if n.op in _NEXT}
  edges = {n.name: [t for t in n.inputs if t in producer and producer[t] not in back]
           for n in nodes}
  pending = {n.name: len(edges[n.name]) for n in nodes}
  readers: dict[str, list[str]] = {}
  for n in nodes:
    for t in edges[n.name]:
      readers.setdefault(producer[t], []).append(n.name)
  by_name = {n.name: n for n in nodes}
  ready = [n.name for n in nodes if pending[n.name] == 0]
  order = []
  while ready:
    name = ready.pop()
    order.append(by_name[name])
    for r in reversed(readers.get(name, ())):
      pending[r] -= 1
      if pending[r] == 0:
        ready.append(r)
  if len(order) != len(nodes):
    raise errors.InputError("the graph has a cycle that is not a while loop's back edge; only "
                            "inference graphs can be pruned")
  return order


def apply_edits(model: TFModel, edits: Edits) -> TFModel:
  """Returns a copy of the model with the edits applied; the model is not changed."""
  return dataclasses.replace(model, graph_def=_edit_graph_def(model.graph_def, edits))


def _edit_graph_def(graph_def: tf.compat.v1.GraphDef, edits: Edits) -> tf.compat.v1.GraphDef:
  out = tf.compat.v1.GraphDef()
  if edits.empty:
    out.CopyFrom(graph_def)
    return out
  # Copy node by node, leaving out the values about to be replaced: the old
  # weights are never duplicated (peak memory stays near the pruned size).
  replaced = {_node_name(t): v for t, v in edits.constants.items()}
  for field in ("versions", "library"):
    if graph_def.HasField(field):
      getattr(out, field).CopyFrom(getattr(graph_def, field))
  for src in graph_def.node:
    node = out.node.add()
    if src.name not in replaced:
      node.CopyFrom(src)
      continue
    node.name, node.op, node.device = src.name, src.op, src.device
    node.input.extend(src.input)
    for key, attr in src.attr.items():
      if key != "value":
        node.attr[key].CopyFrom(attr)
    dtype = tf.dtypes.as_dtype(src.attr["dtype"].type)
    node.attr["value"].tensor.CopyFrom(
        tf.make_tensor_proto(np.asarray(replaced[src.name]), dtype=dtype))
  by_name = {n.name: n for n in out.node}
  for new_name, (src, value) in edits.new_constants.items():
    src_node = by_name[_node_name(src)]
    node = out.node.add()
    node.CopyFrom(src_node)
    node.name = new_name
    dtype = tf.dtypes.as_dtype(node.attr["dtype"].type)
    node.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(np.asarray(value), dtype=dtype))
  for consumer, index, new_name in edits.rewires:
    by_name[consumer].input[index] = new_name
  for name, attr, value in edits.attrs:
    if isinstance(value, tuple):
      del by_name[name].attr[attr].list.i[:]
      by_name[name].attr[attr].list.i.extend(value)
    else:
      by_name[name].attr[attr].i = value
  if edits.drop:
    _drop_nodes(out, set(edits.drop))
  # Recorded shapes would be stale after slicing (also those of function arguments).
  for node in out.node:
    if "_output_shapes" in node.attr:
      del node.attr["_output_shapes"]
  for f in out.library.function:
    for arg in f.arg_attr.values():
      if "_output_shapes" in arg.attr:
        del arg.attr["_output_shapes"]
  return out


def _drop_nodes(graph_def: tf.compat.v1.GraphDef, drop: set[str]) -> None:
  """Removes the nodes named in `drop`, then every Const node that only they read."""
  def read_names(nodes):
    return {_node_name(t) for n in nodes for t in n.input}
  unread = {n.name for n in graph_def.node} - read_names(graph_def.node)
  kept = [n for n in graph_def.node if n.name not in drop]
  while True:
    read = read_names(kept)
    orphans = {n.name for n in kept
               if n.op == "Const" and n.name not in read and n.name not in unread}
    if not orphans:
      break
    kept = [n for n in kept if n.name not in orphans]
  del graph_def.node[:]
  graph_def.node.extend(kept)


def attr(**kw):
  """An AttrValue: attr(type=...), attr(b=...), attr(shape=...), attr(tensor=...)."""
  return tf.compat.v1.AttrValue(**kw)


FLOAT32 = attr(type=tf.float32.as_datatype_enum)
INT32 = attr(type=tf.int32.as_datatype_enum)
INT64 = attr(type=tf.int64.as_datatype_enum)


class NodeWriter:
  """Adds nodes named PREFIX/... to a copy of a model's GraphDef (the training-time
  additions of recovery); refuses a model that already has nodes under the prefix."""

  def __init__(self, model: TFModel, prefix: str):
    if any(n.name.startswith(prefix) for n in model.graph_def.node):
      raise errors.InputError(f"the model already has nodes named {prefix}/...")
    self.prefix = prefix
    self._model = model
    self.graph_def = tf.compat.v1.GraphDef()
    self.graph_def.CopyFrom(model.graph_def)

  def add(self, name: str, op: str, inputs: Sequence[str] = (), **attrs) -> str:
    """Adds node PREFIX/name (attrs: AttrValues) and returns its name."""
    node = self.graph_def.node.add(name=f"{self.prefix}/{name}", op=op, input=list(inputs))
    for key, value in attrs.items():
      node.attr[key].CopyFrom(value)
    return node.name

  def const(self, name: str, value: np.ndarray) -> str:
    tensor = tf.make_tensor_proto(value)
    return self.add(name, "Const", (), dtype=attr(type=tensor.dtype), value=attr(tensor=tensor))

  def model(self, extra_inputs: Sequence[str] = ()) -> TFModel:
    """The model written from, with the written graph and `extra_inputs` after its
    own inputs."""
    return dataclasses.replace(self._model, graph_def=self.graph_def,
                               inputs=tuple(self._model.inputs) + tuple(extra_inputs))


def write(model: TFModel, path: str) -> None:
  """Writes the model in its own format, atomically (temp file, then rename)."""
  graph_def = model.graph_def
  parent = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(parent):
    raise errors.UsageError(f"output directory '{parent}' does not exist")
  size = constant_bytes(graph_def)
  if size >= _PROTO_LIMIT:
    raise errors.UsageError(
        f"the pruned model still holds {size / 2**30:.2f} GiB of constants, and a frozen "
        f"{'SavedModel' if model.kind == SAVED_MODEL else 'GraphDef'} cannot hold 2 GiB; "
        "prune more of it (a higher --ratio); nothing written")
  if model.kind == SAVED_MODEL:
    tmp = tempfile.mkdtemp(prefix=".gp_tmp_", dir=parent)
    try:
      _save_saved_model(model.signature, graph_def, tmp)
      _replace_dir(tmp, path)
    finally:
      shutil.rmtree(tmp, ignore_errors=True)
    return
  data = (text_format.MessageToString(graph_def).encode("utf-8") if model.kind == GRAPHDEF_TEXT
          else serialized(graph_def))
  files.write_atomic(path, data)


def _nbytes(tensor) -> Optional[int]:
  """A TensorProto's bytes from its shape and dtype (nothing decoded); None for an
  unknown dtype."""
  try:
    size = tf.dtypes.as_dtype(tensor.dtype).size
  except TypeError:
    return None
  return math.prod(max(d.size, 0) for d in tensor.tensor_shape.dim) * size


def constant_bytes(graph_def: tf.compat.v1.GraphDef) -> int:
  """The bytes of the graph's constants, from their shapes and dtypes (nothing decoded)."""
  return sum(_nbytes(n.attr["value"].tensor) or 0 for n in graph_def.node
             if n.op == "Const" and "value" in n.attr)


_SPLICE_BYTES = 1 << 20


def _node_chunks(node) -> list:
  """node.SerializeToString(deterministic=True) as pieces. A large plain Const
  (attributes dtype and value only, a packed tensor) is encoded around its
  tensor_content, which is never copied into a node-sized buffer: the encoder's
  buffer and its result were three times the node (a pruned VGG16's first dense
  layer is 100 MB). The fields come in the encoder's order, so the bytes are equal."""
  tensor = node.attr["value"].tensor if node.op == "Const" and "value" in node.attr else None
  # (ListFields and ByteSize are not used: they copy the tensor's bytes, ByteSize 4 times.)
  if (tensor is None or set(node.attr) != {"dtype", "value"} or
      node.HasField("experimental_debug_info") or node.HasField("experimental_type") or
      node.attr["value"].WhichOneof("value") != "tensor"):
    return [node.SerializeToString(deterministic=True)]
  for field in tensor.DESCRIPTOR.fields:
    if field.name not in ("dtype", "tensor_shape", "version_number", "tensor_content") and (
        len(getattr(tensor, field.name)) if field.label == field.LABEL_REPEATED
        else getattr(tensor, field.name) if field.type == field.TYPE_BYTES
        else tensor.HasField(field.name) if field.message_type else False):
      return [node.SerializeToString(deterministic=True)]
  expected = _nbytes(tensor)
  if expected is None or expected < _SPLICE_BYTES:
    return [node.SerializeToString(deterministic=True)]
  content = tensor.tensor_content
  if len(content) != expected:
    return [node.SerializeToString(deterministic=True)]
  head = type(node)(name=node.name, op=node.op, input=node.input, device=node.device)
  head.attr["dtype"].CopyFrom(node.attr["dtype"])
  meta = type(tensor)(dtype=tensor.dtype, version_number=tensor.version_number)
  meta.tensor_shape.CopyFrom(tensor.tensor_shape)
  meta_bytes = meta.SerializeToString(deterministic=True)
  content_head = b"\x22" + _varint(len(content))                  # TensorProto.tensor_content = 4
  tensor_len = len(meta_bytes) + len(content_head) + len(content)
  value_head = b"\x42" + _varint(tensor_len)                       # AttrValue.tensor = 8
  value_len = len(value_head) + tensor_len
  entry_head = b"\x0a\x05value\x12" + _varint(value_len)           # map entry: key 1, value 2
  entry_len = len(entry_head) + value_len
  return [head.SerializeToString(deterministic=True), b"\x2a" + _varint(entry_len),  # attr = 5
          entry_head, value_head, meta_bytes, content_head, content]


def _varint(n: int) -> bytes:
  out = bytearray()
  while True:
    byte, n = n & 0x7F, n >> 7
    if n:
      out.append(byte | 0x80)
    else:
      out.append(byte)
      return bytes(out)


# GraphDef's fields in number order, as the protobuf encoder writes them:
# node = 1, library = 2, version = 3 (deprecated int32), versions = 4, debug_info = 5.
def serialized(graph_def: tf.compat.v1.GraphDef) -> Iterator[bytes]:
  """graph_def.SerializeToString(deterministic=True), chunk by chunk: one node at a
  time, so that writing a model never holds its whole serialisation (the encoder's
  growing buffer and the final copy were about four times the pruned VGG16)."""
  if {f.number for f in graph_def.DESCRIPTOR.fields} != {1, 2, 3, 4, 5}:
    yield graph_def.SerializeToString(deterministic=True)  # a GraphDef this code does not know
    return
  for node in graph_def.node:
    chunks = _node_chunks(node)
    yield b"\x0a" + _varint(sum(len(c) for c in chunks))
    yield from chunks
    del chunks
  if graph_def.HasField("library"):
    data = graph_def.library.SerializeToString(deterministic=True)
    yield b"\x12" + _varint(len(data)) + data
  if graph_def.version:
    yield b"\x18" + _varint(graph_def.version & 0xFFFFFFFFFFFFFFFF)
  if graph_def.HasField("versions"):
    data = graph_def.versions.SerializeToString(deterministic=True)
    yield b"\x22" + _varint(len(data)) + data
  if graph_def.HasField("debug_info"):
    data = graph_def.debug_info.SerializeToString(deterministic=True)
    yield b"\x2a" + _varint(len(data)) + data


def _replace_dir(src: str, dst: str) -> None:
  if os.path.isdir(dst):
    old = dst + ".gp_old"
    os.replace(dst, old)
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)
  else:
    if os.path.exists(dst):
      os.remove(dst)
    os.replace(src, dst)


def freeze(model, input_shape: Sequence[Optional[int]], input_name: str = "input",
           output_name: Optional[str] = None) -> tuple[tf.compat.v1.GraphDef, str, str]:
  """A Keras model (or any callable on one tensor) frozen into a GraphDef in
  inference mode (batch norm on moving statistics): input placeholder
  `input_name` of shape [None] + input_shape, and the output renamed to
  `output_name` if given. Returns (graph_def, input tensor, output tensor). The
  one freezing helper of the project (tests, benchmarks, the default model)."""
  spec = tf.TensorSpec([None] + list(input_shape), tf.float32, name=input_name)
  call = (lambda x: model(x, training=False)) if hasattr(model, "layers") else model
  concrete = tf.function(call).get_concrete_function(spec)
  frozen = convert_to_constants.convert_variables_to_constants_v2(concrete)
  graph_def = frozen.graph.as_graph_def()
  output = frozen.outputs[0].name
  if output_name is not None:
    # The function's return value is a sink Identity: renaming it touches no input.
    sink = frozen.outputs[0].op.name
    if any(n.name == output_name for n in graph_def.node):
      raise ValueError(f"the frozen graph already has a node '{output_name}'")
    for node in graph_def.node:
      if any(i.lstrip("^").split(":")[0] == sink for i in node.input):
        raise ValueError(f"output node '{sink}' has readers; cannot rename it")
      if node.name == sink:
        node.name = output_name
    output = f"{output_name}:0"
  return graph_def, frozen.inputs[0].name, output


def rename_functions(graph_def: tf.compat.v1.GraphDef) -> tf.compat.v1.GraphDef:
  """Gives every library function a name derived from its content.

  Grappler rewrites function bodies (ConvNeXt's XLA-compiled grouped
  convolutions) but keeps their names; importing such a graph eagerly into a
  process that already registered the original definitions would clash.
  """
  if not graph_def.library.function:
    return graph_def
  out = tf.compat.v1.GraphDef()
  out.CopyFrom(graph_def)
  mapping = {}
  for f in out.library.function:
    digest = hashlib.sha1(f.SerializeToString(deterministic=True)).hexdigest()[:12]
    mapping[f.signature.name] = f"{f.signature.name}_gp{digest}"

  def fix(attrs):
    for v in attrs.values():
      if v.HasField("func") and v.func.name in mapping:
        v.func.name = mapping[v.func.name]
      for fn in v.list.func:
        if fn.name in mapping:
          fn.name = mapping[fn.name]

  for node in out.node:
    fix(node.attr)
  for f in out.library.function:
    f.signature.name = mapping[f.signature.name]
    for node in f.node_def:
      fix(node.attr)
  for grad in out.library.gradient:
    grad.function_name = mapping.get(grad.function_name, grad.function_name)
  return out


def concrete_function(graph_def: tf.compat.v1.GraphDef, inputs: Sequence[str], fetches):
  """The graph as an eager-callable function of `inputs` (tensor names) returning
  `fetches` (a list of tensor names, or a dict key -> tensor name). Returns the
  function and its feed tensors. Library functions are renamed by content first,
  so that several such graphs (an original and its pruned copy) live in one
  process."""
  graph_def = rename_functions(graph_def)

  def _import():
    tf.compat.v1.import_graph_def(graph_def, name="")
  wrapped = tf.compat.v1.wrap_function(_import, [])
  g = wrapped.graph
  feeds = [g.as_graph_element(t) for t in inputs]
  if isinstance(fetches, dict):
    targets = {key: g.as_graph_element(t) for key, t in fetches.items()}
  else:
    targets = [g.as_graph_element(t) for t in fetches]
  return wrapped.prune(feeds=feeds, fetches=targets), feeds


def _save_saved_model(sig: Signature, graph_def, path: str) -> None:
  pruned, feeds = concrete_function(graph_def, [t for _, t in sig.inputs], dict(sig.outputs))
  specs = [tf.TensorSpec(f.shape, f.dtype, name=key) for (key, _), f in zip(sig.inputs, feeds)]
  module = tf.Module()
  module.pruned = pruned
  serve = tf.function(lambda *args: pruned(*args), input_signature=specs)
  tf.saved_model.save(module, path, signatures={sig.name: serve.get_concrete_function()})


def _needs_onednn(e: Exception) -> bool:
  """Whether a session failed for want of an NCHW kernel that only oneDNN has."""
  text = e.message if isinstance(e, tf.errors.OpError) else str(e)
  return "only supports NHWC" in text or "only NHWC" in text


def _first_line(e: Exception) -> str:
  """The line of a TensorFlow error that says what went wrong (an OpError opens
  with "Graph execution error:" and where it was raised), with the node."""
  text = e.message if isinstance(e, tf.errors.OpError) else str(e)
  node = getattr(e, "op", None)
  noise = ("Graph execution error", "Detected at node", "Node:", "[[", "File ", "  ")
  lines = [line.strip() for line in text.splitlines()
           if line.strip() and not line.strip().startswith(noise) and not line.startswith("  ")]
  line = lines[0] if lines else type(e).__name__
  if node is not None and getattr(node, "name", None):
    line = f"{node.name}: {line}"
  return line[:300]


def low_precision(graph_def: tf.compat.v1.GraphDef) -> bool:
  """Whether the graph computes in bfloat16 or float16 anywhere (tf_cast's graphs)."""
  low = {tf.bfloat16.as_datatype_enum, tf.float16.as_datatype_enum}
  return any(a.type in low or any(t in low for t in a.list.type)
             for n in graph_def.node for a in n.attr.values())


class Runner:
  """Runs a model's graph in a session of its own: feeds in input order, fetches outputs.

  TensorFlow's CPU kernels for NCHW pooling and some other NCHW ops exist only
  with oneDNN, which TensorFlow enables on CPUs with AVX-512 and similar (off with
  TF_ENABLE_ONEDNN_OPTS=0, and on most laptops): where the session fails for that
  reason, the graph runs compiled by XLA instead, which takes any layout. A
  bfloat16 or float16 graph, whose CPU kernels are incomplete in the same way,
  runs under XLA from the start.
  """

  def __init__(self, model: TFModel, extra: Sequence[str] = (), optimize: bool = True,
               arrays: Optional[Mapping[str, np.ndarray]] = None):
    """`extra`: intermediate tensors fetched after the outputs. optimize=False
    switches off grappler and the graph optimiser: for a few runs (the oracle's)
    they only cost time, and memory for the copies of the constants they make;
    the large weights are then fed, taken from `arrays` (tensor name -> value, the
    view's constants: no new copy) where it has them, else decoded."""
    self._model, self._fetches = model, list(model.outputs) + list(extra)
    self._xla = None
    self._xla_only = low_precision(model.graph_def)
    self._graph = tf.Graph()
    # Without optimisation the large weights are fed rather than imported: the
    # graph then holds no copy of them, and each run reads the decoded arrays.
    fed = frozenset()
    if arrays is not None and not optimize:
      # Every floating-point weight the caller has (the masked model's among them)
      # is fed; integer constants (shapes, axes) stay in the graph.
      fed = frozenset(_node_name(t) for t, v in arrays.items()
                      if np.ndim(v) and np.issubdtype(np.asarray(v).dtype, np.floating))
    graph_def, heavy = (model.graph_def, {}) if optimize else _light(model.graph_def, fed)
    self._graph_def = graph_def
    try:
      with self._graph.as_default():
        tf.compat.v1.import_graph_def(graph_def, name="")
    except (ValueError, tf.errors.OpError) as e:
      raise errors.RunError(f"TensorFlow cannot import the graph ({_first_line(e)})") from None
    self._inputs = [self._graph.get_tensor_by_name(t) for t in model.inputs]
    self._outputs = [self._graph.get_tensor_by_name(t) for t in self._fetches]
    arrays = arrays or {}
    # Aligned, so that each run reads them in place (graph/arrays.py).
    self._weights = {self._graph.get_tensor_by_name(f"{name}:0"):
                     arrays_lib.aligned(arrays[f"{name}:0"]) if f"{name}:0" in arrays
                     else _aligned_value(node.attr["value"].tensor)
                     for name, node in heavy.items()}
    config = config_pb2.ConfigProto()
    if not optimize:
      config.graph_options.rewrite_options.disable_meta_optimizer = True
      config.graph_options.optimizer_options.opt_level = config_pb2.OptimizerOptions.L0
      config.graph_options.optimizer_options.do_constant_folding = False
    self._session = tf.compat.v1.Session(graph=self._graph, config=config)

  def __call__(self, feeds: Sequence[np.ndarray]) -> list[np.ndarray]:
    if self._xla is not None:
      return self._run_xla(feeds)
    if not self._xla_only:
      try:
        return self._session.run(self._outputs,
                                 {**self._weights, **dict(zip(self._inputs, feeds))})
      except (ValueError, TypeError, tf.errors.OpError) as e:
        if not _needs_onednn(e):
          raise errors.RunError(f"TensorFlow failed to run the graph ({_first_line(e)})"
                                ) from None
    weights = [t.name for t in self._weights]
    fn, _ = concrete_function(self._graph_def, list(self._model.inputs) + weights,
                              self._fetches)
    self._xla = tf.function(lambda *args: fn(*args), jit_compile=True)
    return self._run_xla(feeds)

  def _run_xla(self, feeds: Sequence[np.ndarray]) -> list[np.ndarray]:
    try:
      args = [tf.constant(f) for f in list(feeds) + list(self._weights.values())]
      return [np.asarray(v) for v in self._xla(*args)]
    except (ValueError, TypeError, tf.errors.OpError) as e:
      raise errors.RunError(f"TensorFlow (XLA) failed to run the graph ({_first_line(e)})"
                            ) from None

  def close(self) -> None:
    self._session.close()
    self._session = self._graph = self._xla = self._weights = self._graph_def = None
