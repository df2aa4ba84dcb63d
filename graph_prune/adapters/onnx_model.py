"""ONNX adapter: the only place that imports onnx and onnxruntime.

Reads an ONNX model (weights as initializers or Constant nodes, inline or as
external data), builds the graph view from ONNX shape inference, writes
constant edits back into a copy of the ModelProto (Constant-node weights are
sliced where they stand), validates the result with onnx.checker and strict
shape inference, and writes it atomically, keeping external data external.
Opset, IR version, names, metadata and doc strings are never touched.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import shutil
import tempfile
from typing import Optional, Sequence

import numpy as np
import onnx
from google.protobuf import message as pb_message
from onnx import external_data_helper
from onnx import numpy_helper

from graph_prune import errors
from graph_prune import files
from graph_prune.graph import view
from graph_prune.graph.edits import Edits


@dataclasses.dataclass(frozen=True)
class ONNXModel:
  proto: onnx.ModelProto
  inputs: tuple[str, ...]
  outputs: tuple[str, ...]
  external_data: bool = False   # whether the input kept weights in a side file


def array(t: onnx.TensorProto) -> np.ndarray:
  """The tensor's values; InputError when they do not fit its dtype and dims."""
  try:
    return numpy_helper.to_array(t)
  except (ValueError, TypeError, KeyError, AssertionError) as e:
    raise errors.InputError(f"tensor '{t.name}' does not hold the values its dtype and dims "
                            f"say ({str(e).splitlines()[0][:120]}); the model is corrupt") from None


def _tensors(proto: onnx.ModelProto) -> list[onnx.TensorProto]:
  return list(proto.graph.initializer) + [
      a.t for n in proto.graph.node for a in n.attribute if a.HasField("t")]


def _has_external_data(proto: onnx.ModelProto) -> bool:
  return any(t.data_location == onnx.TensorProto.EXTERNAL for t in _tensors(proto))


def load(path: str, signature: Optional[str] = None, inputs: Sequence[str] = (),
         outputs: Sequence[str] = ()) -> ONNXModel:
  """Reads an ONNX file (and its external data); never modifies it."""
  if signature:
    raise errors.UsageError("--signature applies to SavedModel directories only")
  if not os.path.isfile(path):
    raise errors.InputError(f"input '{path}' does not exist; give an .onnx file")
  proto = onnx.ModelProto()
  try:
    with open(path, "rb") as f:
      proto.ParseFromString(f.read())
  except (pb_message.DecodeError, RuntimeWarning, ValueError) as e:
    raise errors.InputError(f"'{path}' is not an ONNX model ({str(e).splitlines()[0]})") from None
  if not proto.graph.node:
    raise errors.InputError(f"'{path}' is not an ONNX model (no graph nodes)")
  external = _has_external_data(proto)
  if external:
    base = os.path.dirname(path) or "."
    for t in _tensors(proto):
      if t.data_location == onnx.TensorProto.EXTERNAL:
        where = {e.key: e.value for e in t.external_data}.get("location", "")
        if not os.path.isfile(os.path.join(base, where)):
          raise errors.InputError(f"external data of '{path}' is missing or unreadable "
                                  f"('{where}' for tensor '{t.name}'); keep the data file "
                                  "beside the model")
  try:
    # With external data the checker reads the file itself: a model over protobuf's
    # 2 GiB cannot be checked in memory, and the data is then read once, below.
    onnx.checker.check_model(path if external else proto)
  except Exception as e:  # pylint: disable=broad-except  (the checker's errors on a corrupt file vary)
    raise errors.InputError(f"'{path}' fails onnx.checker ({type(e).__name__}: "
                            f"{(str(e).splitlines() or [''])[0][:200]})") from None
  if external:
    try:
      external_data_helper.load_external_data_for_model(proto, os.path.dirname(path) or ".")
    except (OSError, onnx.checker.ValidationError) as e:
      raise errors.InputError(f"external data of '{path}' is missing or unreadable "
                              f"({str(e).splitlines()[0][:200]}); keep the data file beside "
                              "the model") from None
  inits = {t.name for t in proto.graph.initializer}
  found_in = [i.name for i in proto.graph.input if i.name not in inits]
  found_out = [o.name for o in proto.graph.output]
  known = ({i.name for i in proto.graph.input} | {o for n in proto.graph.node for o in n.output})
  for t, what in [(t, "input") for t in inputs] + [(t, "output") for t in outputs]:
    if t not in known:
      raise errors.UsageError(f"{what} '{t}' is not a tensor of the graph; check --{what}s")
  return ONNXModel(proto, tuple(inputs) or tuple(found_in), tuple(outputs) or tuple(found_out),
                   external)


# Ops whose result is not a function of their inputs alone are never folded.
_UNFOLDABLE = {"Constant", "RandomNormal", "RandomUniform", "RandomNormalLike",
               "RandomUniformLike", "Multinomial", "Bernoulli", "If", "Loop", "Scan",
               # A quantized (QDQ) model's weights stay int8 codes: see _WeightCodes.
               "DequantizeLinear"}


@dataclasses.dataclass(frozen=True)
class _WeightCodes:
  """A DequantizeLinear of constant codes (a QDQ model's weight or bias). The
  analysis sees its output as a float constant; edits to that constant are
  applied to the codes, the scale and the zero point, so the model stays int8."""
  node: int                 # position in graph.node
  codes: str
  scale: str
  zero: Optional[str]
  axis: Optional[int]       # the quantization axis, None for per-tensor


def _const_arrays(proto: onnx.ModelProto) -> dict:
  """Constant tensor name -> its initializer or Constant node (read with _value)."""
  values = {t.name: t for t in proto.graph.initializer}
  for n in proto.graph.node:
    if n.op_type == "Constant":
      values[n.output[0]] = n
  return values


def _value(v) -> Optional[np.ndarray]:
  return array(v) if isinstance(v, onnx.TensorProto) else _constant_value(v)


def _weight_codes(proto: onnx.ModelProto) -> dict[str, _WeightCodes]:
  """Output tensor -> _WeightCodes for every DequantizeLinear of constant inputs."""
  consts = _const_arrays(proto)
  found = {}
  for i, n in enumerate(proto.graph.node):
    if (n.op_type != "DequantizeLinear" or n.domain not in ("", "ai.onnx")
        or not all(t in consts for t in n.input if t)
        or any(a.name == "block_size" and a.i for a in n.attribute)):
      continue
    zero = n.input[2] if len(n.input) > 2 and n.input[2] else None
    scale = _value(consts[n.input[1]])
    axis = None
    if scale is not None and scale.size > 1:
      codes = consts[n.input[0]]
      rank = len(codes.dims) if isinstance(codes, onnx.TensorProto) else _value(codes).ndim
      axis = next((a.i for a in n.attribute if a.name == "axis"), 1) % rank
    found[n.output[0]] = _WeightCodes(i, n.input[0], n.input[1], zero, axis)
  return found


def _along(v: np.ndarray, axis: Optional[int], rank: int) -> np.ndarray:
  """A per-axis parameter shaped to broadcast against a rank-`rank` tensor."""
  if axis is None:
    return v.reshape(())  if v.size == 1 else v
  shape = [1] * rank
  shape[axis] = -1
  return v.reshape(shape)


def _dequantize(codes: np.ndarray, scale: np.ndarray, zero: Optional[np.ndarray],
                axis: Optional[int]) -> np.ndarray:
  """(codes - zero) * scale, computed as ONNX Runtime does (float32 products)."""
  q = codes.astype(np.int64)
  if zero is not None:
    q = q - _along(zero.astype(np.int64), axis, codes.ndim)
  return q.astype(scale.dtype) * _along(scale, axis, codes.ndim)


def _subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
  out = []
  for a in node.attribute:
    if a.type == onnx.AttributeProto.GRAPH:
      out.append(a.g)
    elif a.type == onnx.AttributeProto.GRAPHS:
      out.extend(a.graphs)
  return out


def captures(node: onnx.NodeProto) -> tuple[str, ...]:
  """Outer-scope tensors that the node's subgraphs (at any depth) read by name,
  in first-read order."""
  found: dict[str, None] = {}

  def visit(graph: onnx.GraphProto, outer_defined: frozenset) -> None:
    defined = set(outer_defined)
    defined.update(i.name for i in graph.input)
    defined.update(t.name for t in graph.initializer)
    defined.update(t.values.name for t in graph.sparse_initializer)
    for n in graph.node:
      for t in n.input:
        if t and t not in defined:
          found.setdefault(t)
      for sub in _subgraphs(n):
        visit(sub, frozenset(defined))
      defined.update(o for o in n.output if o)

  for sub in _subgraphs(node):
    visit(sub, frozenset())
  return tuple(found)


def normalise(model: ONNXModel) -> ONNXModel:
  """Folds nodes whose inputs are all constants (tf2onnx leaves shape arithmetic
  such as Gather/Slice/Concat/Cast over folded shapes) into initializers, using
  ONNX's own reference evaluator. Batch-norm and Constant-node weights stay as
  they are: they have rules of their own."""
  from onnx import reference  # pylint: disable=g-import-not-at-top
  src = model.proto
  graph = src.graph
  consts = {t: v for t, v in _const_arrays(src).items()
            if isinstance(v, onnx.TensorProto) or _constant_value(v) is not None}
  outputs = {o.name for o in graph.output}
  kept, folded = [], []
  for node in graph.node:
    inputs = [t for t in node.input if t]
    if (node.op_type in _UNFOLDABLE or node.domain not in ("", "ai.onnx") or not inputs
        or not all(t in consts for t in inputs) or any(o in outputs for o in node.output)):
      kept.append(node)
      continue
    values = [_value(consts[t]) for t in inputs]
    sub = onnx.helper.make_model(
        onnx.helper.make_graph(
            [node], "fold",
            [onnx.helper.make_tensor_value_info(t, onnx.helper.np_dtype_to_tensor_dtype(v.dtype),
                                                v.shape) for t, v in zip(inputs, values)],
            [onnx.helper.make_empty_tensor_value_info(o) for o in node.output if o]),
        opset_imports=src.opset_import, ir_version=src.ir_version)
    try:
      results = reference.ReferenceEvaluator(sub).run(None, dict(zip(inputs, values)))
    except Exception:  # pylint: disable=broad-except
      kept.append(node)  # the evaluator lacks this op: leave it to the rules
      continue
    for name, value in zip([o for o in node.output if o], results):
      tensor = numpy_helper.from_array(np.asarray(value), name)
      folded.append(tensor)
      consts[name] = tensor
  if not folded:
    return model
  # Folded tensors that nothing reads any more are dropped with their nodes
  # (a read inside a subgraph counts).
  read = {t for n in kept for t in (*n.input, *captures(n))} | outputs
  # So are initializers that only folded nodes read.
  kept_ids = {id(n) for n in kept}
  only_folded = {t for n in graph.node if id(n) not in kept_ids for t in n.input} - read
  proto = _copy_model(src, nodes=kept, drop=only_folded)
  proto.graph.initializer.extend(t for t in folded if t.name in read)
  # Initializers listed as graph inputs too (always before IR 4; torch's
  # keep_initializers_as_inputs) leave with their input entry.
  inputs = [i for i in proto.graph.input if i.name not in only_folded]
  if len(inputs) != len(proto.graph.input):
    del proto.graph.input[:]
    proto.graph.input.extend(inputs)
  return dataclasses.replace(model, proto=proto)


def _copy_fields(src, dst, skip=()) -> None:
  """Copies every set field of message src into dst, except those named in skip."""
  for field, value in src.ListFields():
    if field.name in skip:
      continue
    if field.is_repeated:
      getattr(dst, field.name).extend(value)
    elif field.message_type:
      getattr(dst, field.name).CopyFrom(value)
    else:
      setattr(dst, field.name, value)


def _copy_model(src: onnx.ModelProto, nodes=None, replace=None, drop=frozenset()
                ) -> onnx.ModelProto:
  """A copy of src, with other nodes, initializers replaced by name (`replace`:
  name -> TensorProto) and initializers left out (`drop`). Replaced weights are
  never copied first."""
  out = onnx.ModelProto()
  _copy_fields(src, out, skip=("graph",))
  _copy_fields(src.graph, out.graph, skip=("node", "initializer"))
  out.graph.node.extend(src.graph.node if nodes is None else nodes)
  replace = replace or {}
  out.graph.initializer.extend(replace.get(t.name, t) for t in src.graph.initializer
                               if t.name not in drop)
  return out


def _attr(a: onnx.AttributeProto):
  value = onnx.helper.get_attribute_value(a)
  if isinstance(value, bytes):
    return value.decode("utf-8", "replace")
  if isinstance(value, list):
    return tuple(v.decode("utf-8", "replace") if isinstance(v, bytes) else v for v in value)
  if isinstance(value, (int, float, str)):
    return value
  return None  # tensors, graphs: rules read Constant values from the view's constants


def _constant_value(node: onnx.NodeProto) -> Optional[np.ndarray]:
  for a in node.attribute:
    if a.name == "value":
      return array(a.t)
    if a.name in ("value_float", "value_int"):
      return np.asarray(onnx.helper.get_attribute_value(a),
                        np.float32 if a.name == "value_float" else np.int64)
    if a.name in ("value_floats", "value_ints"):
      return np.asarray(onnx.helper.get_attribute_value(a),
                        np.float32 if a.name == "value_floats" else np.int64)
  return None


def node_names(proto: onnx.ModelProto) -> list[str]:
  """A unique name per node, in graph order (ONNX allows empty and repeated names)."""
  seen, out = set(), []
  for i, node in enumerate(proto.graph.node):
    name = node.name or f"{node.op_type}_{i}"
    if name in seen:
      name = f"{name}_{i}"
    seen.add(name)
    out.append(name)
  return out


def _shape(type_proto) -> Optional[tuple]:
  t = type_proto.tensor_type
  if not t.HasField("shape"):
    return None
  return tuple(d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim)


_SMALL_ELEMENTS = 1024


def _without_weights(proto: onnx.ModelProto) -> onnx.ModelProto:
  """A copy for shape inference: large initializers become typed graph inputs, so
  the weights are not copied to C++ and back; small ones (shape constants that
  data propagation reads) stay."""
  light = onnx.ModelProto()
  for field in ("ir_version", "producer_name", "producer_version", "domain", "model_version"):
    setattr(light, field, getattr(proto, field))
  light.opset_import.extend(proto.opset_import)
  light.functions.extend(proto.functions)
  g, src = light.graph, proto.graph
  g.name = src.name
  g.node.extend(src.node)
  g.input.extend(src.input)
  g.output.extend(src.output)
  g.value_info.extend(src.value_info)
  inputs = {i.name for i in src.input}
  for t in src.initializer:
    if math.prod(t.dims) <= _SMALL_ELEMENTS:
      g.initializer.append(t)
    elif t.name not in inputs:
      g.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
  if light.ir_version < 4:
    light.ir_version = 4  # inputs without initializers: allowed from IR 4 on
  return light


# Protobuf serialises no message of 2 GiB or more; the graph itself needs some room.
_PROTO_LIMIT = 2**31 - 2**26


def _nbytes(t: onnx.TensorProto) -> int:
  """A tensor's bytes from its dims and type (nothing decoded)."""
  size = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize if t.data_type else 0
  return math.prod(t.dims) * size


def weight_bytes(proto: onnx.ModelProto) -> int:
  """The bytes of the model's initializers, from their dims (nothing is decoded)."""
  return sum(_nbytes(t) for t in proto.graph.initializer)


def too_large(proto: onnx.ModelProto) -> bool:
  """Whether the model cannot be serialised whole (its weights reach protobuf's limit):
  it is then checked without its weights, written with external data, and run with its
  weights handed to ONNX Runtime as arrays."""
  return weight_bytes(proto) >= _PROTO_LIMIT


@functools.lru_cache(maxsize=None)
def _dtype_name(elem_type: int) -> str:
  return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).name


def to_view(model: ONNXModel) -> view.GraphView:
  proto = model.proto
  try:
    inferred = onnx.shape_inference.infer_shapes(_without_weights(proto), data_prop=True)
  except onnx.shape_inference.InferenceError as e:
    raise errors.InputError(f"ONNX shape inference failed ({str(e).splitlines()[0][:200]})"
                            ) from None
  g = inferred.graph
  shapes, dtypes = {}, {}
  for vi in list(g.input) + list(g.value_info) + list(g.output):
    shapes[vi.name] = _shape(vi.type)
    elem = vi.type.tensor_type.elem_type
    if elem:
      dtypes[vi.name] = _dtype_name(elem)
  constants = {t.name: array(t) for t in proto.graph.initializer}
  missing = [o for n in proto.graph.node for o in n.output
             if o and shapes.get(o) is None and o not in constants]
  if missing:
    shapes.update(_run_shapes(model, missing, shapes, dtypes))
  nodes = []
  weights = _weight_codes(proto)
  for name, node in zip(node_names(proto), proto.graph.node):
    if node.output and node.output[0] in weights:
      # A quantized weight: to the analysis, the float constant it dequantizes to.
      w = weights[node.output[0]]
      constants[node.output[0]] = _dequantize(
          constants[w.codes], constants[w.scale],
          constants[w.zero] if w.zero else None, w.axis)
      continue
    attrs = {a.name: v for a in node.attribute if (v := _attr(a)) is not None}
    # Ops of other domains (com.microsoft, custom) have no description: they block.
    op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
    nodes.append(view.Node(name, op, tuple(node.input), tuple(node.output), attrs,
                           captures(node)))
    if node.op_type == "Constant":
      value = _constant_value(node)
      if value is not None:
        constants[node.output[0]] = value
  if weights:
    # Codes, scales and zero points that only weight dequantizers read are not
    # constants of the analysed graph: their float values are.
    read = {t for n in nodes for t in n.inputs + n.captures} | set(model.outputs)
    parts = {t for w in weights.values() for t in (w.codes, w.scale, w.zero) if t}
    for t in parts - read:
      del constants[t]
  return view.GraphView(nodes, constants, shapes, model.inputs, model.outputs, "NCHW", dtypes,
                        opset_version(proto))


_PROBE_BATCH = 7  # an unusual batch size, to tell the batch axis in measured shapes


def _run_shapes(model: ONNXModel, missing: Sequence[str], shapes, dtypes) -> dict:
  """Shapes that ONNX shape inference could not give (it stops at a Loop, some
  function ops, custom domains), measured by running the model once in ONNX
  Runtime on random inputs: a dim 0 equal to the probe batch becomes unknown, as
  the batch is. Tensors it still cannot measure stay unknown."""
  import onnxruntime  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  options = onnxruntime.SessionOptions()
  options.log_severity_level = 4
  for size in (8, 32, 64, 224):
    feeds = {}
    for t in model.inputs:
      dims = [d if d is not None else _PROBE_BATCH if i == 0 else size
              for i, d in enumerate(shapes.get(t) or ())]
      dtype = np.dtype(dtypes.get(t, "float32"))
      feeds[t] = np.asarray(rng.standard_normal(dims) > 0 if dtype == np.bool_ else
                            rng.standard_normal(dims)).astype(dtype)
    try:
      values = Runner(model, missing, options)(list(feeds.values()))
    except errors.RunError:
      continue
    batch_unknown = any((shapes.get(t) or (1,))[0] is None for t in model.inputs)
    out = {}
    for name, value in zip(missing, values[len(model.outputs):]):
      dims = [int(d) for d in np.shape(value)]
      out[name] = tuple(None if (i == 0 and batch_unknown and d == _PROBE_BATCH) else d
                        for i, d in enumerate(dims))
      dtypes.setdefault(name, np.asarray(value).dtype.name)
    return out
  return {}


def opset_version(proto: onnx.ModelProto) -> int:
  """The model's opset of the default ONNX domain."""
  return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 1)


def _tensor(value: np.ndarray, name: str, like: Optional[onnx.TensorProto]) -> onnx.TensorProto:
  value = np.asarray(value)
  if like is not None:
    value = value.astype(onnx.helper.tensor_dtype_to_np_dtype(like.data_type), copy=False)
  return numpy_helper.from_array(value, name)


def _cut_codes(w: _WeightCodes, parts: list, selection) -> list:
  """[codes, scale, zero] with the cuts of `selection` applied: slicing cuts the
  codes, and the scale and zero point where they run along the cut axis; masking
  sets the codes to the zero point, which dequantizes to exactly 0."""
  codes, scale, zero = parts
  mode, cuts = selection
  if mode == "slice":
    for axis, keep in cuts:
      if keep.all():
        continue
      codes = np.compress(keep, codes, axis=axis)
      if w.axis == axis:
        scale = np.compress(keep, scale)
        zero = None if zero is None else np.compress(keep, zero)
    return [codes, scale, zero]
  kept = np.ones(codes.shape, bool)
  for axis, keep in cuts:
    index = [slice(None)] * codes.ndim
    index[axis] = ~keep
    kept[tuple(index)] = False
  rest = np.zeros((), codes.dtype) if zero is None else _along(zero, w.axis, codes.ndim)
  return [np.where(kept, codes, rest).astype(codes.dtype), scale, zero]


def _edits_on_codes(proto: onnx.ModelProto, weights: dict[str, _WeightCodes], edits: Edits):
  """The edits with every edit of a quantized weight's float value turned into
  edits of its codes, scale and zero point; and the DequantizeLinear nodes to
  add for weights that readers need in different cuts, as (after node, node)."""
  consts = _const_arrays(proto)
  readers: dict[str, int] = {}
  for n in proto.graph.node:
    for t in n.input:
      readers[t] = readers.get(t, 0) + 1
  names = node_names(proto)
  constants = dict(edits.constants)
  new_constants = dict(edits.new_constants)
  rewires = list(edits.rewires)
  added = []

  def cut(name: str, value: np.ndarray, w: _WeightCodes):
    """[(part name, its value, its cut value)] for the codes, scale and zero point
    present, each read once."""
    if name not in edits.selections:
      raise errors.InputError(
          f"'{name}' is an int8 weight of a quantized (QDQ) model and this step computes new "
          "float values for it (reconstruction); graph_prune only cuts quantized weights: "
          "prune and reconstruct the float model, then quantize it (--quantize=int8)")
    parts = [_value(consts[t]) if t else None for t in (w.codes, w.scale, w.zero)]
    new = _cut_codes(w, parts, edits.selections[name])
    if not np.array_equal(_dequantize(new[0], new[1], new[2], w.axis), value):
      raise AssertionError(f"the cut codes of '{name}' do not dequantize to the cut weight")
    return [(t, old, cut_value) for t, old, cut_value in zip((w.codes, w.scale, w.zero), parts, new)
            if t]

  def unchanged(old: np.ndarray, value: np.ndarray) -> bool:
    return value is old or (value.shape == old.shape and np.array_equal(value, old))

  for name in [n for n in edits.constants if n in weights]:
    w = weights[name]
    for slot, (part, old, value) in enumerate(cut(name, constants.pop(name), w)):
      if unchanged(old, value):
        continue
      if readers.get(part, 0) == 1:
        constants[part] = value
      else:  # shared with other nodes: this dequantizer gets a copy
        copy = f"{part}/gp_copy/{name}"
        new_constants[copy] = (part, value)
        rewires.append((names[w.node], slot, copy))
  for new_name, (src, value) in list(edits.new_constants.items()):
    if src not in weights:
      continue
    w = weights[src]
    del new_constants[new_name]
    inputs = []
    for part, old, part_value in cut(new_name, value, w):
      if not unchanged(old, part_value):
        new_constants[f"{new_name}/{part}"] = (part, part_value)
        part = f"{new_name}/{part}"
      inputs.append(part)
    node = onnx.NodeProto()
    node.CopyFrom(proto.graph.node[w.node])
    node.name = f"{names[w.node]}/gp_copy/{new_name}"
    del node.input[:]
    node.input.extend(inputs)
    del node.output[:]
    node.output.append(new_name)
    added.append((w.node, node))
  return dataclasses.replace(edits, constants=constants, new_constants=new_constants,
                             rewires=tuple(rewires)), added


def _drop_nodes(graph: onnx.GraphProto, positions: set[int]) -> None:
  """Removes the nodes at `positions`, then the initializers and Constant nodes that
  only they read (a read inside a subgraph counts)."""
  def reads(nodes):
    return {t for n in nodes for t in (*n.input, *captures(n))} | {o.name for o in graph.output}
  before = reads(graph.node)
  kept = [n for i, n in enumerate(graph.node) if i not in positions]
  while True:
    read = reads(kept)
    orphans = {id(n) for n in kept if n.op_type == "Constant" and n.output[0] not in read
               and n.output[0] in before}
    if not orphans:
      break
    kept = [n for n in kept if id(n) not in orphans]
  read = reads(kept)
  inits = [t for t in graph.initializer if t.name in read or t.name not in before]
  inputs = {i.name for i in graph.input}
  del graph.node[:]
  graph.node.extend(kept)
  if len(inits) != len(graph.initializer):
    gone = {t.name for t in graph.initializer} - {t.name for t in inits}
    del graph.initializer[:]
    graph.initializer.extend(inits)
    if gone & inputs:   # before IR 4 every initializer is a graph input too
      kept_inputs = [i for i in graph.input if i.name not in gone]
      del graph.input[:]
      graph.input.extend(kept_inputs)


def apply_edits(model: ONNXModel, edits: Edits) -> ONNXModel:
  """Returns a copy with the edits applied and shapes re-inferred; the model is not changed."""
  added = []
  weights = _weight_codes(model.proto)
  if weights:
    edits, added = _edits_on_codes(model.proto, weights, edits)
  src_inits = {t.name: t for t in model.proto.graph.initializer}
  out = _copy_model(model.proto, replace={
      name: _tensor(value, name, src_inits[name])
      for name, value in edits.constants.items() if name in src_inits})
  if edits.empty:
    return dataclasses.replace(model, proto=out)
  graph = out.graph
  inits = {t.name: t for t in graph.initializer}
  const_nodes = {n.output[0]: n for n in graph.node if n.op_type == "Constant"}
  for name, value in edits.constants.items():
    if name not in inits:
      node = const_nodes[name]
      old = next((a for a in node.attribute if a.name == "value"), None)
      like = old.t if old is not None else None
      kept = [a for a in node.attribute if not a.name.startswith("value")]
      del node.attribute[:]
      node.attribute.extend(kept)
      node.attribute.append(onnx.helper.make_attribute("value", _tensor(value, "", like)))
  for new_name, (src, value) in edits.new_constants.items():
    like = inits[src] if src in inits else None
    graph.initializer.append(_tensor(value, new_name, like))
    if out.ir_version < 4:  # before IR 4, every initializer is also a graph input
      graph.input.append(onnx.helper.make_tensor_value_info(
          new_name, graph.initializer[-1].data_type, list(np.shape(value))))
  index = {name: i for i, name in enumerate(node_names(model.proto))}
  for consumer, i, new_name in edits.rewires:
    graph.node[index[consumer]].input[i] = new_name
  for name, attr, value in edits.attrs:
    node = graph.node[index[name]]
    kept = [a for a in node.attribute if a.name != attr]
    del node.attribute[:]
    node.attribute.extend(kept + [onnx.helper.make_attribute(attr, value)])
  # Copies of a quantized weight's dequantizer, each right after the original.
  if edits.drop:
    _drop_nodes(graph, set(index[name] for name in edits.drop))
  if added:
    nodes = list(graph.node)
    for after, node in sorted(added, key=lambda a: a[0], reverse=True):
      nodes.insert(after + 1, node)
    del graph.node[:]
    graph.node.extend(nodes)
  # An initializer listed among the graph inputs (before IR 4 all are; torch's
  # keep_initializers_as_inputs) declares its shape there too.
  for inp in graph.input:
    if inp.name in edits.constants and inp.name in inits:
      value = edits.constants[inp.name]
      dims = inp.type.tensor_type.shape.dim
      for d, size in zip(dims, np.shape(value)):
        d.dim_value = size
  # Recorded intermediate shapes are stale after slicing: re-infer those the model had.
  had = {vi.name for vi in graph.value_info}
  graph.ClearField("value_info")
  if had:
    inferred = onnx.shape_inference.infer_shapes(_without_weights(out))
    graph.value_info.extend(vi for vi in inferred.graph.value_info if vi.name in had)
  return dataclasses.replace(model, proto=out)


def validate(proto: onnx.ModelProto) -> None:
  """onnx.checker (full) and strict shape inference; raises InputError on failure. A
  model too large to serialise is checked without its large weights (as typed graph
  inputs: the structure and every shape; its values were decoded into the view)."""
  if too_large(proto):
    proto = _without_weights(proto)
  try:
    onnx.checker.check_model(proto, full_check=True)
    onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
  except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
    raise errors.InputError(f"the model fails ONNX validation ({str(e).splitlines()[0][:300]})"
                            ) from None


def write(model: ONNXModel, path: str) -> None:
  """Validates, then writes atomically; external data goes to '<name>.data' beside it."""
  parent = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(parent):
    raise errors.UsageError(f"output directory '{parent}' does not exist")
  validate(model.proto)
  tmp = tempfile.mkdtemp(prefix=".gp_tmp_", dir=parent)
  try:
    name = os.path.basename(path)
    proto = onnx.ModelProto()
    proto.CopyFrom(model.proto)
    if model.external_data or too_large(proto):
      onnx.save_model(proto, os.path.join(tmp, name), save_as_external_data=True,
                      all_tensors_to_one_file=True, location=name + ".data", size_threshold=1024)
      files.make_readable(os.path.join(tmp, name + ".data"))
      os.replace(os.path.join(tmp, name + ".data"), path + ".data")
    else:
      with open(os.path.join(tmp, name), "wb") as f:
        f.write(proto.SerializeToString(deterministic=True))
    os.replace(os.path.join(tmp, name), path)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


class Runner:
  """Runs a model in ONNX Runtime on the CPU: feeds in input order, fetches outputs."""

  def __init__(self, model: ONNXModel, extra: Sequence[str] = (), options=None,
               optimize: bool = True, arrays=None):
    """`extra`: intermediate tensors fetched after the outputs; optimize=False
    runs ONNX Runtime's basic graph optimisations only (the oracle's few runs).
    The session reads the weights from the model; a model too large to serialise
    (too_large) gets its large weights as arrays instead, taken from `arrays`
    (tensor -> value, the view's constants: no new copy) where it has them."""
    import onnxruntime  # pylint: disable=g-import-not-at-top
    if options is None:
      options = onnxruntime.SessionOptions()
      options.log_severity_level = 4  # errors come back as RunError, not log lines
      if not optimize:
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC
        # Pre-packed weights are a second copy of each, worth it only over many runs.
        options.add_session_config_entry("session.disable_prepacking", "1")
    graph = model.proto.graph
    # Extra fetches must be graph outputs: added for serialising, then taken off
    # again (the model is left as it was; copying it would copy every weight).
    added = [t for t in extra if t not in {o.name for o in graph.output}]
    graph.output.extend(onnx.helper.make_empty_tensor_value_info(t) for t in added)
    self._weights = []
    try:
      if too_large(model.proto):
        data, names, self._weights = _with_weights_apart(model.proto, arrays or {})
        options.add_external_initializers(names, self._weights)
      else:
        data = model.proto.SerializeToString()
    finally:
      del graph.output[len(graph.output) - len(added):]
    try:
      self._session = onnxruntime.InferenceSession(data, options,
                                                   providers=["CPUExecutionProvider"])
    except Exception as e:  # pylint: disable=broad-except  (ORT raises its own many types)
      raise errors.RunError(
          f"ONNX Runtime cannot load the model ({errors.first_line(e)})") from None
    self._inputs = list(model.inputs)
    self._outputs = list(model.outputs) + list(extra)

  def __call__(self, feeds: Sequence[np.ndarray]) -> list[np.ndarray]:
    try:
      return self._session.run(self._outputs, dict(zip(self._inputs, feeds)))
    except Exception as e:  # pylint: disable=broad-except
      raise errors.RunError(
          f"ONNX Runtime failed to run the model ({errors.first_line(e)})") from None

  def close(self) -> None:
    self._session = None
    self._weights = []


# Initializers of at least this many bytes go to ONNX Runtime as arrays (too_large).
_APART_BYTES = 1 << 20


def _with_weights_apart(proto: onnx.ModelProto, arrays) -> tuple[bytes, list, list]:
  """The model serialised with each large initializer marked as external data, and
  those initializers' names and values as OrtValues for
  SessionOptions.add_external_initializers (ONNX Runtime reads the arrays in place;
  the values come from `arrays` where it has them, else decoded one at a time)."""
  import onnxruntime  # pylint: disable=g-import-not-at-top
  light = onnx.ModelProto()
  _copy_fields(proto, light, skip=("graph",))
  _copy_fields(proto.graph, light.graph, skip=("initializer",))
  names, values = [], []
  for t in proto.graph.initializer:
    if _nbytes(t) < _APART_BYTES:
      light.graph.initializer.append(t)
      continue
    stub = light.graph.initializer.add()
    stub.name, stub.data_type = t.name, t.data_type
    stub.dims.extend(t.dims)
    stub.data_location = onnx.TensorProto.EXTERNAL
    entry = stub.external_data.add()
    entry.key, entry.value = "location", "graph_prune-in-memory"
    value = arrays.get(t.name)
    if (value is None or tuple(np.shape(value)) != tuple(t.dims) or
        np.asarray(value).dtype != onnx.helper.tensor_dtype_to_np_dtype(t.data_type)):
      value = array(t)   # (a view's constant of another dtype: a quantized weight's value)
    value = np.ascontiguousarray(value)
    names.append(t.name)
    values.append(onnxruntime.OrtValue.ortvalue_from_numpy(value))
  return light.SerializeToString(), names, values
