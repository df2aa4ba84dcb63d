"""ONNX op descriptions (opsets 7 to 21): one channel rule per op kind and opset
range, with the op's weights, kernel and batch-norm statistics where it has them.

Layout is NCHW with OIHW weights (Conv), [C_in, C_out/group, kH, kW]
(ConvTranspose), [K, N] (MatMul) and [K, N] or [N, K] (Gemm with transB).
Where an op changed meaning or moved an attribute to an input (Softmax at 13,
Squeeze/Unsqueeze/Split/ReduceSum axes at 13, other Reduce* axes at 18, Pad and
Clip at 11, Slice at 10, Resize's inputs at 11), each opset range has its own
description, and each reads only what its opset defines. An op without a
description for the model's opset blocks its channels.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from graph_prune.graph import view
from graph_prune.ops import channels as base
from graph_prune.ops import desc
from graph_prune.ops.channels import ChannelDim, RuleContext, describe

REGISTRY = desc.Registry("onnx")
_op = REGISTRY.op
_out = base.output


def _input(ctx: RuleContext, i: int) -> Optional[str]:
  inputs = ctx.node.inputs
  return inputs[i] if len(inputs) > i and inputs[i] else None


def _attr_ints(ctx: RuleContext, attr: str) -> Optional[list[int]]:
  value = ctx.node.attrs.get(attr)
  return None if value is None else [int(v) for v in value]


def _input_ints(ctx: RuleContext, i: int) -> Optional[list[int]]:
  """A constant int input; None when absent or not constant."""
  t = _input(ctx, i)
  return None if t is None else base.const_ints(ctx, t)


def _bias(ctx: RuleContext, index: int) -> None:
  b = _input(ctx, index)
  if b is not None:
    ctx.slice_const(b, 0, _out(ctx), base.PARAM)


def _conv_linear(g: view.GraphView, node: view.Node):
  w = g.constants.get(node.inputs[1]) if len(node.inputs) > 1 else None
  if w is None or w.ndim < 3:
    return None
  group = int(node.attrs.get("group", 1))
  return desc.spatial_linear(node, w, 0, 1, True, int(w.shape[1]), groups=group,
                             multiplier=int(w.shape[0]) // group if w.shape[1] == 1 else 1,
                             bias=node.inputs[2] if len(node.inputs) > 2 else "")


@_op("Conv", linear=_conv_linear,
     doc="creates channels (filters, OI... axis 0); input channels cut axis 1; depthwise "
         "(group = channels) follows its input and rewrites group; grouped: every group "
         "loses the same positions of its input and output blocks, group stays; 1-D, 2-D, 3-D")
def conv(ctx: RuleContext) -> None:
  x, w = ctx.node.inputs[:2]
  if not base.constant(ctx, w, "weights"):
    return
  cout, cin_per_group = ctx.graph.constants[w].shape[:2]
  group = ctx.node.attrs.get("group", 1)
  d = ctx.dim(x)
  if group == 1:
    if d is not None:
      ctx.slice_const(w, 1, x, base.SINK)
    ctx.new_source(_out(ctx), 1, cout, w, 0)
    _bias(ctx, 2)
    return
  if cin_per_group == 1 and cout % group == 0:
    # Depthwise (group == channels, one input channel per group, multiplier M):
    # output channel c*M + m reads input channel c. Decided from the group
    # attribute, never from shapes alone: a one-filter convolution is not depthwise.
    if d is None:
      return
    if len(d) != group:
      ctx.block(d.units, f"{describe(ctx.node)}: group {group} does not match {len(d)} channels")
      return
    units = np.repeat(d.units, cout // group)
    ctx.set_dim(_out(ctx), ChannelDim(1, units))
    ctx.slice_const(w, 0, _out(ctx), base.SINK)
    ctx.set_attr_count("group", x)
    _bias(ctx, 2)
    return
  # Grouped: group b reads input block b and writes output block b. Position k of
  # every block is coupled, so each group loses the same channels and `group` stays.
  if d is not None:
    if len(d) != cin_per_group * group:
      ctx.block(d.units, f"{describe(ctx.node)}: {len(d)} channels for {group} groups of "
                f"{cin_per_group}")
      return
    first = base.couple_blocks(ctx, d.units, group)
    ctx.slice_const(w, 1, ctx.virtual("group_in", ChannelDim(1, first)), base.SINK)
  if cout % group:
    base.block_inputs(ctx, f"{describe(ctx.node)}: {cout} filters for {group} groups")
    return
  out = ctx.new_source(_out(ctx), 1, cout, w, 0)
  base.couple_blocks(ctx, out.units, group)
  _bias(ctx, 2)


def _conv_transpose_linear(g: view.GraphView, node: view.Node):
  w = g.constants.get(node.inputs[1]) if len(node.inputs) > 1 else None
  if w is None or w.ndim < 3:
    return None
  return desc.spatial_linear(node, w, 1, 0, True, int(w.shape[0]),
                             groups=int(node.attrs.get("group", 1)), transposed=True)


@_op("ConvTranspose", linear=_conv_transpose_linear,
     doc="creates channels (weight axis 1, per group); input channels cut axis 0; grouped: "
         "every group loses the same positions")
def conv_transpose(ctx: RuleContext) -> None:
  x, w = ctx.node.inputs[:2]
  if not base.constant(ctx, w, "weights"):
    return
  if ctx.node.attrs.get("output_shape") is not None and len(ctx.node.attrs["output_shape"]) > 2:
    base.block_inputs(ctx, f"{describe(ctx.node)}: output_shape names the channels")
    return
  group = int(ctx.node.attrs.get("group", 1))
  cin, cout_per_group = ctx.graph.constants[w].shape[:2]
  d = ctx.dim(x)
  if d is not None:
    if len(d) != cin or cin % group:
      ctx.block(d.units, f"{describe(ctx.node)}: {len(d)} channels for weights of {cin}")
      return
    base.couple_blocks(ctx, d.units, group)
    ctx.slice_const(w, 0, x, base.SINK)
  if group == 1:
    ctx.new_source(_out(ctx), 1, cout_per_group, w, 1)
  else:
    # One element per position of a group's output block, shared by all groups.
    block = ctx.new_source(f"{ctx.node.name}#group_out", 1, cout_per_group, w, 1)
    ctx.set_dim(_out(ctx), ChannelDim(1, np.tile(block.units, group)))
  _bias(ctx, 2)


def _bn_norm(g: view.GraphView, node: view.Node):
  del g
  scale, shift, mean, variance = node.inputs[1:5]
  return desc.Norm(scale, shift, mean, variance, 1, float(node.attrs.get("epsilon", 1e-5)))


@_op("BatchNormalization", since=7, norm=_bn_norm,
     doc="inference batch norm on axis 1: scale, bias, mean, variance sliced; training "
         "mode blocks")
def batch_norm(ctx: RuleContext) -> None:
  d = ctx.dim(ctx.node.inputs[0])
  if d is None:
    return
  params = ctx.node.inputs[1:5]
  if d.axis != 1 or ctx.node.attrs.get("training_mode", 0) or len(ctx.node.outputs) > 1:
    ctx.block(d.units, f"{describe(ctx.node)}: channels not on axis 1, or training mode")
    return
  if not all(ctx.graph.is_const(p) and ctx.graph.shape(p) == (len(d),) for p in params):
    ctx.block(d.units, f"{describe(ctx.node)}: parameters are not per-channel constants")
    return
  for role, p in zip((base.SCALE, base.PARAM, base.PARAM, base.PARAM), params):
    ctx.slice_const(p, 0, _out(ctx), role)
  ctx.set_dim(_out(ctx), d)


def _dense(ctx: RuleContext, a: str, w: str, in_axis: int, out_axis: int,
           contracted: Optional[int] = None) -> None:
  """a @ w: a's `contracted` axis (default its last) cuts w's `in_axis`; w's
  `out_axis` creates the output's channels (its last axis)."""
  d = ctx.dim(a)
  if d is not None:
    rank = ctx.graph.rank(a) or 0
    if d.axis != (rank - 1 if contracted is None else contracted):
      ctx.block(d.units, f"{describe(ctx.node)}: channels are not the contracted axis")
      return
    ctx.slice_const(w, in_axis, a, base.SINK)
  out_rank = ctx.graph.rank(_out(ctx)) or 2
  ctx.new_source(_out(ctx), out_rank - 1, ctx.graph.constants[w].shape[out_axis], w, out_axis)


def _gemm_linear(g: view.GraphView, node: view.Node):
  lin = desc.dense_linear(g, node, bool(node.attrs.get("transB", 0)),
                          bias=node.inputs[2] if len(node.inputs) > 2 else "",
                          alpha=float(node.attrs.get("alpha", 1.0)),
                          beta=float(node.attrs.get("beta", 1.0)))
  if lin is not None and node.attrs.get("transA", 0):
    lin = dataclasses.replace(lin, channel_axis=0)   # A's channels are its rows
  return lin


@_op("Gemm", linear=_gemm_linear,
     doc="A x constant B creates channels (B's columns, or rows with transB); A's contracted "
         "axis (its columns, or rows with transA) cuts B; a constant row C is sliced")
def gemm(ctx: RuleContext) -> None:
  a, b = ctx.node.inputs[:2]
  attrs = ctx.node.attrs
  if not ctx.graph.is_const(b) or ctx.graph.is_const(a):
    base.block_inputs(ctx, f"{describe(ctx.node)}: only computed A x constant B")
    return
  in_axis, out_axis = (1, 0) if attrs.get("transB", 0) else (0, 1)
  n = ctx.graph.constants[b].shape[out_axis]
  c = _input(ctx, 2)
  if c is not None:
    shape = ctx.graph.shape(c)
    if not ctx.graph.is_const(c) or shape is None or (len(shape) == 2 and shape[0] != 1):
      base.block_inputs(ctx, f"{describe(ctx.node)}: C is not a constant row")
      return
  _dense(ctx, a, b, in_axis, out_axis, contracted=0 if attrs.get("transA", 0) else 1)
  if c is not None and ctx.graph.shape(c) and ctx.graph.shape(c)[-1] == n and n > 1:
    ctx.slice_const(c, len(ctx.graph.shape(c)) - 1, _out(ctx), base.PARAM)


def _matmul_linear(g: view.GraphView, node: view.Node):
  return desc.dense_linear(g, node, transposed=False)


@_op("MatMul", linear=_matmul_linear,
     doc="x @ constant 2-D W creates channels (W's columns); x's last axis cuts W's rows")
def matmul(ctx: RuleContext) -> None:
  a, b = ctx.node.inputs[:2]
  if not ctx.graph.is_const(b) or ctx.graph.is_const(a) or ctx.graph.rank(b) != 2:
    base.block_inputs(ctx, f"{describe(ctx.node)}: only x @ constant 2-D weights")
    return
  _dense(ctx, a, b, 0, 1)


def _elementwise(ctx: RuleContext) -> None:
  base.elementwise(ctx, [t for t in ctx.node.inputs if t], _out(ctx))


_op("Add", "Sum", affine="shift",
    doc="broadcasting elementwise: computed operands couple their channels (residual adds), "
        "per-channel constants are sliced, anything else blocks")(_elementwise)
_op("Mul", affine="scale", doc="as Add; a per-channel constant factor is a scale")(_elementwise)
_op("Sub", "Div", "Max", "Min", "Pow", "Mean", "PRelu",
    doc="broadcasting elementwise, as Add")(_elementwise)
_op("Clip", since=11, doc="min and max are inputs: as Add")(_elementwise)


_UNARY = ("Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu", "Selu",
          "Celu", "Softplus", "Softsign", "Exp", "Log", "Erf", "Neg", "Abs", "Sqrt",
          "Reciprocal", "Identity", "Dropout", "Cast", "Floor", "Ceil", "Round", "Sign",
          "Gelu", "Mish", "ThresholdedRelu", "Not")


@_op(*_UNARY, doc="elementwise on one tensor: channels pass through")
@_op("Clip", until=11, doc="min and max are attributes: channels pass through")
def unary(ctx: RuleContext) -> None:
  base.pass_through(ctx, ctx.node.inputs[0], _out(ctx))


@_op("QuantizeLinear", "DequantizeLinear", since=10,
     doc="activation (de)quantization, elementwise: a per-tensor scale and zero point "
         "pass channels through; per-axis ones on the channel axis are sliced with them; "
         "another axis, blocked quantization or computed parameters block. (A weight's "
         "DequantizeLinear of constant codes is the constant itself in the analysis: its "
         "int8 codes are sliced with their per-channel scales and zero points.)")
def quantize_linear(ctx: RuleContext) -> None:
  x = ctx.node.inputs[0]
  d = ctx.dim(x)
  if d is None:
    return
  params = [t for t in ctx.node.inputs[1:3] if t]
  if not all(ctx.graph.is_const(t) for t in params) or ctx.node.attrs.get("block_size"):
    ctx.block(d.units, f"{describe(ctx.node)}: scale or zero point not constant, or "
              "blocked quantization")
    return
  sizes = [ctx.graph.constants[t].size for t in params]
  if all(size == 1 for size in sizes):
    base.pass_through(ctx, x, _out(ctx))
    return
  rank = ctx.graph.rank(x)
  axis = base.normalise_axis(int(ctx.node.attrs.get("axis", 1)), rank) if rank else None
  if axis != d.axis or any(ctx.graph.shape(t) != (len(d),) for t in params):
    ctx.block(d.units, f"{describe(ctx.node)}: quantized per axis, not along the channels")
    return
  for t in params:
    ctx.slice_const(t, 0, x, base.PARAM)
  ctx.set_dim(_out(ctx), d)


@_op("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool",
     doc="spatial pooling (1-D, 2-D, 3-D) passes channels through")
def pool(ctx: RuleContext) -> None:
  base.pass_on_axis(ctx, ctx.node.inputs[0], _out(ctx), 1, "axis 1")


def _reduce(ctx: RuleContext, axes: Optional[list[int]]) -> None:
  """A reduction over `axes`; no axes means every axis (the channels too), unless
  noop_with_empty_axes (opset 13/18 on) makes it the identity."""
  if not axes and ctx.node.attrs.get("noop_with_empty_axes", 0) and not _input(ctx, 1):
    base.pass_through(ctx, ctx.node.inputs[0], _out(ctx))
    return
  base.reduce(ctx, ctx.node.inputs[0], axes, bool(ctx.node.attrs.get("keepdims", 1)))


_REDUCE = ("ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
           "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare")


@_op(*_REDUCE, until=18, doc="axes attribute: reduction off the channels passes them")
@_op("ReduceSum", until=13, doc="axes attribute: reduction off the channels passes them")
def reduce_attr(ctx: RuleContext) -> None:
  _reduce(ctx, _attr_ints(ctx, "axes"))


@_op(*_REDUCE, since=18, doc="axes input: reduction off the channels passes them")
@_op("ReduceSum", since=13, doc="axes input: reduction off the channels passes them")
def reduce_input(ctx: RuleContext) -> None:
  if _input(ctx, 1) is not None and _input_ints(ctx, 1) is None:
    d = ctx.dim(ctx.node.inputs[0])
    if d is not None:
      ctx.block(d.units, f"{describe(ctx.node)}: reduction axes are not constant")
    return
  _reduce(ctx, _input_ints(ctx, 1))


def _pad(ctx: RuleContext, pads: Optional[list[int]], axes: Optional[list[int]]) -> None:
  x = ctx.node.inputs[0]
  found = base.dim_and_rank(ctx, x, pads is not None, "pads are not constant")
  if found is None:
    return
  d, rank = found
  axes = [base.normalise_axis(a, rank) for a in axes] if axes else list(range(rank))
  n = len(axes)
  before = after = 0
  for k, a in enumerate(axes):
    if a == d.axis:
      before, after = pads[k], pads[k + n]
  base.pad_channels(ctx, d, before, after, ctx.node.attrs.get("mode", "constant") == "constant")


@_op("Pad", until=11, doc="pads attribute ('paddings' in opset 1): padding off the channel "
     "axis passes channels through; constant padding of the channel axis adds fixed channels")
def pad_attr(ctx: RuleContext) -> None:
  _pad(ctx, _attr_ints(ctx, "pads") or _attr_ints(ctx, "paddings"), None)


@_op("Pad", since=11, doc="pads input (and axes input from 18): as before opset 11")
def pad_input(ctx: RuleContext) -> None:
  if _input(ctx, 3) is not None and _input_ints(ctx, 3) is None:
    _pad(ctx, None, None)
    return
  _pad(ctx, _input_ints(ctx, 1), _input_ints(ctx, 3))


@_op("Concat", doc="along the channels: the operands' channels laid end to end (the same tensor "
     "twice keeps two ranges); along another axis: the operands couple")
def concat(ctx: RuleContext) -> None:
  base.concat(ctx, [t for t in ctx.node.inputs if t], ctx.node.attrs.get("axis", 1))


@_op("Flatten", doc="Flatten(axis=1) of a static shape: channels followed into the flattened "
     "C x H x W positions")
def flatten(ctx: RuleContext) -> None:
  x = ctx.node.inputs[0]
  d = ctx.dim(x)
  if d is None:
    return
  shape = ctx.graph.shape(x)
  if shape is None:
    ctx.block(d.units, f"{describe(ctx.node)}: input shape unknown")
    return
  axis = base.normalise_axis(ctx.node.attrs.get("axis", 1), len(shape))
  # Flatten's output shape is derived at run time: no constant to rewrite.
  target = [-1, int(np.prod([s for s in shape[axis:]]))] if None not in shape[axis:] else None
  if axis != 1 or target is None:
    ctx.block(d.units, f"{describe(ctx.node)}: only Flatten(axis=1) of a static shape")
    return
  base.follow_reshape(ctx, d, shape, target, [None, None], _out(ctx))


_TRANSPARENT = ("Cast", "Identity", "Unsqueeze", "Squeeze")


def _skip(ctx: RuleContext, tensor: str):
  """The producer of `tensor`, looking through casts and unit-axis changes."""
  node = ctx.graph.producer(tensor)
  while node is not None and node.op in _TRANSPARENT:
    node = ctx.graph.producer(node.inputs[0])
  return node


def _batch_of(ctx: RuleContext, tensor: str, x: str) -> bool:
  """True when `tensor` is x's batch size read at run time: entry 0 of Shape(x)
  picked by Gather or Slice, through casts and through Gathers that permute the
  shape vector (tf2onnx's NHWC view of an NCHW tensor, for Keras's Flatten)."""
  node = _skip(ctx, tensor)
  if node is None or node.op not in ("Gather", "Slice"):
    return False
  if node.op == "Gather":
    if base.const_ints(ctx, node.inputs[1]) != [0] or node.attrs.get("axis", 0) != 0:
      return False
  elif [base.const_ints(ctx, t) for t in node.inputs[1:3]] != [[0], [1]]:
    return False
  position, node = 0, _skip(ctx, node.inputs[0])
  while node is not None and node.op == "Gather" and node.attrs.get("axis", 0) == 0:
    indices = base.const_ints(ctx, node.inputs[1])
    if indices is None or position >= len(indices):
      return False
    position, node = indices[position], _skip(ctx, node.inputs[0])
  if node is None or node.op != "Shape" or node.attrs.get("start", 0) or position != 0:
    return False
  source = node.inputs[0]
  if source == x:
    return True
  # x = Transpose(source) with the batch axis left in place.
  producer = ctx.graph.producer(x)
  return (producer is not None and producer.op == "Transpose" and
          producer.inputs[0] == source and (producer.attrs.get("perm") or (1,))[0] == 0)


def _shape_reads(ctx: RuleContext, tensor: str, depth: int = 0):
  """A shape vector computed at run time (torch's reshapes and chunks: Concat,
  Unsqueeze, Gather or Slice of Shape, with integer Add/Sub/Mul/Div by
  constants), entry by entry: (value from the static shapes or None, (tensor,
  axis) it reads or None for a constant, the function of that size it computes).
  None when it is computed otherwise."""
  node = ctx.graph.producer(tensor)
  values = base.const_ints(ctx, tensor)
  if values is not None:
    return [(v, None, None) for v in values]
  if node is None or depth > 16:
    return None
  if node.op in ("Cast", "Identity", "Unsqueeze", "Squeeze"):
    return _shape_reads(ctx, node.inputs[0], depth + 1)
  if node.op == "Shape":
    shape = ctx.graph.shape(node.inputs[0])
    if shape is None:
      return None
    start, end = node.attrs.get("start", 0), node.attrs.get("end", len(shape))
    return [(shape[i], (node.inputs[0], i), lambda c: c) for i in range(len(shape))[start:end]]
  if node.op == "Concat":
    parts = [_shape_reads(ctx, t, depth + 1) for t in node.inputs]
    return None if any(p is None for p in parts) else [e for p in parts for e in p]
  if node.op in ("Gather", "Slice"):
    entries = _shape_reads(ctx, node.inputs[0], depth + 1)
    if entries is None:
      return None
    if node.op == "Gather":
      index = base.const_ints(ctx, node.inputs[1])
      return None if index is None else [entries[i] for i in index]
    bounds = [base.const_ints(ctx, t) for t in node.inputs[1:3]]
    return None if None in bounds else entries[slice(bounds[0][0], bounds[1][0])]
  if node.op in _ARITHMETIC and len(node.inputs) == 2:
    entries = _shape_reads(ctx, node.inputs[0], depth + 1)
    k = base.const_ints(ctx, node.inputs[1])
    if entries is None or k is None or len(k) != 1 or (node.op == "Div" and not k[0]):
      return None
    op, k = _ARITHMETIC[node.op], k[0]
    out = []
    for v, src, fn in entries:
      if src is None:
        out.append((None if v is None else op(v, k), None, None))
      else:
        out.append((None if v is None else op(v, k), src, lambda c, fn=fn: op(fn(c), k)))
    return out
  return None


# Integer arithmetic of shape values (sizes are positive: Div truncates = floors).
_ARITHMETIC = {"Add": lambda a, k: a + k, "Sub": lambda a, k: a - k,
               "Mul": lambda a, k: a * k, "Div": lambda a, k: a // k}


def _reshape_target(ctx: RuleContext, shape_t: str, x: str, reader: str):
  """Target entries; per entry the (constant, position, reader) that holds it, or
  None where it follows pruning by itself (the run-time batch size, written -1,
  or a size read from a shape at run time); and per entry the (tensor, axis,
  function) a run-time size reads, or None."""
  target = base.const_ints(ctx, shape_t)
  if target is not None:
    return target, [(shape_t, j, reader) for j in range(len(target))], [None] * len(target)
  concat = _skip(ctx, shape_t)
  if concat is None or concat.op != "Concat" or concat.attrs.get("axis") not in (0, -1):
    return None, None, None
  target, refs, reads = [], [], []
  for piece in concat.inputs:
    values = base.const_ints(ctx, piece)
    if values is not None:
      target.extend(values)
      refs.extend((piece, k, concat.name) for k in range(len(values)))
      reads.extend([None] * len(values))
      continue
    if not target and _batch_of(ctx, piece, x):
      target.append(-1)
      refs.append(None)
      reads.append(None)
      continue
    entries = _shape_reads(ctx, piece)
    if entries is None:
      return None, None, None
    for value, src, fn in entries:
      if value is None and (target or src is None or src[1] != 0):
        return None, None, None
      target.append(-1 if value is None else value)   # -1: an unknown run-time batch
      refs.append(None)
      reads.append(None if src is None else (src[0], src[1], fn))
  return target, refs, reads


def _channel_reads(ctx: RuleContext, reads, d: ChannelDim) -> Optional[dict[int, object]]:
  """Target positions whose run-time size reads d's channel count: {position:
  the function of the count it computes}. None when one reads channels other
  than d's (it would not follow this node's pruning)."""
  out = {}
  for j, read in enumerate(reads or ()):
    if read is None:
      continue
    tensor, axis, fn = read
    src = ctx.dim(tensor)
    if src is None or src.axis != axis:
      continue   # a batch or spatial size: pruning leaves it as it is
    if not np.array_equal(src.units, d.units):
      return None
    out[j] = fn
  return out


def _always(fn, counts, want) -> bool:
  """Whether a run-time size fn(count) equals want(count) for every channel count
  pruning may leave."""
  return all(fn(c) == want(c) for c in counts)


def _resolved_target(ctx: RuleContext, node: view.Node):
  """(target, resolved, refs, reads) of Reshape `node`: the target as written;
  with 0 entries replaced by the input's size (1 for an unknown batch); per entry
  the constant to rewrite, or None where the entry follows pruning by itself (0,
  -1, a run-time size); and per entry the (tensor, axis, function) a run-time size
  reads. None when the target is not static."""
  x, shape_t = node.inputs[:2]
  target, target_refs, reads = _reshape_target(ctx, shape_t, x, node.name)
  in_shape = ctx.graph.shape(x)
  if target is None or in_shape is None:
    return None
  refs, resolved = [], []
  for j, t in enumerate(target):
    if t == 0 and not node.attrs.get("allowzero", 0):
      # 0 copies the input's size at run time: it follows pruning by itself.
      resolved.append(None if j >= len(in_shape) else
                      1 if in_shape[j] is None and j == 0 else in_shape[j])
      refs.append(None)
    else:
      resolved.append(t)
      refs.append(None if t == -1 else target_refs[j])
  if any(v is None for v in resolved):
    return None
  return target, resolved, refs, reads


def _shuffle(ctx: RuleContext, d: ChannelDim, in_shape, resolved, refs, channel_reads) -> bool:
  """Follows a channel shuffle that starts at this Reshape (see base.follow_shuffle)."""
  a = d.axis
  if len(resolved) != len(in_shape) + 1 or a + 1 >= len(resolved):
    return False
  groups, per = resolved[a], resolved[a + 1]
  if groups <= 1 or per <= 0 or groups * per != len(d):
    return False
  transpose = base.only_reader(ctx, _out(ctx), "Transpose")
  if transpose is None:
    return False
  perm = list(range(len(resolved)))
  perm[a], perm[a + 1] = a + 1, a
  if list(transpose.attrs.get("perm") or ()) != perm:
    return False
  back = base.only_reader(ctx, transpose.outputs[0], "Reshape")
  found = _resolved_target(ctx, back) if back is not None else None
  if found is None or len(found[1]) != len(in_shape) or found[1][a] not in (len(d), -1):
    return False
  # Sizes read at run time may follow the channels only where the shuffle puts
  # them, and only if they give the right sizes for every count it may keep.
  back_reads = _channel_reads(ctx, found[3], d)
  if back_reads is None or set(back_reads) - {a} or set(channel_reads) - {a + 1}:
    return False
  counts = range(groups, len(d) + 1, groups)
  if not (_always(back_reads.get(a, lambda c: c), counts, lambda c: c) and
          _always(channel_reads.get(a + 1, lambda c: c // groups), counts,
                  lambda c: c // groups)):
    return False
  base.follow_shuffle(ctx, d, groups, back.outputs[0], refs[a + 1], found[2][a])
  return True


@_op("Reshape", since=5, doc="static target (constants, or tf2onnx's Concat of the run-time batch "
     "size and constants): channels followed through merged axes (Flatten into a dense "
     "layer) and folded groups (decomposed GroupNorm: whole groups go), the target's "
     "channel entry rewritten; Reshape-Transpose-Reshape channel shuffles followed through "
     "the permutation (each group keeps the same positions)")
def reshape(ctx: RuleContext) -> None:
  x = ctx.node.inputs[0]
  d = ctx.dim(x)
  if d is None:
    return
  found = _resolved_target(ctx, ctx.node)
  if found is None:
    ctx.block(d.units, f"{describe(ctx.node)}: target shape is not static")
    return
  target, resolved, refs, reads = found
  in_shape = ctx.graph.shape(x)
  channel_reads = _channel_reads(ctx, reads, d)
  if channel_reads is None:
    ctx.block(d.units, f"{describe(ctx.node)}: target reads the size of other channels")
    return
  if _shuffle(ctx, d, in_shape, resolved, refs, channel_reads):
    return
  if channel_reads:
    # A size read from the channels at run time must be where they land, and
    # scale with the count kept.
    known = [1 if (i == 0 and v is None) else v for i, v in enumerate(in_shape)]
    span = base.merge_span(known, resolved, d.axis) if None not in known else None
    if span is None or set(channel_reads) != {span[0]} or not _always(
        channel_reads[span[0]], range(1, len(d) + 1),
        lambda c: c * resolved[span[0]] // len(d)):
      ctx.block(d.units, f"{describe(ctx.node)}: target reads the channel count where the "
                "channels do not land")
      return
  base.follow_reshape(ctx, d, in_shape, resolved, refs, _out(ctx))


@_op("Squeeze", until=13, doc="axes attribute: the channel axis moves; squeezing it blocks")
def squeeze_attr(ctx: RuleContext) -> None:
  base.squeeze(ctx, ctx.node.inputs[0], _attr_ints(ctx, "axes") or [])


@_op("Squeeze", since=13, doc="axes input: the channel axis moves; squeezing it blocks")
def squeeze_input(ctx: RuleContext) -> None:
  d = ctx.dim(ctx.node.inputs[0])
  if d is not None and _input(ctx, 1) is not None and _input_ints(ctx, 1) is None:
    ctx.block(d.units, f"{describe(ctx.node)}: axes are not constant")
    return
  base.squeeze(ctx, ctx.node.inputs[0], _input_ints(ctx, 1) or [])


def _unsqueeze(ctx: RuleContext, axes: Optional[list[int]]) -> None:
  x = ctx.node.inputs[0]
  found = base.dim_and_rank(ctx, x, axes is not None, "axes or rank unknown")
  if found is None:
    return
  d, rank = found
  out_rank = rank + len(axes)
  axes = sorted(base.normalise_axis(a, out_rank) for a in axes)
  pos = d.axis
  for a in axes:  # inserted axes push the channel axis right
    if a <= pos:
      pos += 1
  ctx.set_dim(_out(ctx), ChannelDim(pos, d.units))


@_op("Unsqueeze", until=13, doc="axes attribute: the channel axis moves")
def unsqueeze_attr(ctx: RuleContext) -> None:
  _unsqueeze(ctx, _attr_ints(ctx, "axes"))


@_op("Unsqueeze", since=13, doc="axes input: the channel axis moves")
def unsqueeze_input(ctx: RuleContext) -> None:
  _unsqueeze(ctx, _input_ints(ctx, 1))


def _transpose_reads(g: view.GraphView, node: view.Node) -> Optional[str]:
  del g
  return {(0, 3, 1, 2): "NHWC", (0, 2, 3, 1): "NCHW"}.get(tuple(node.attrs.get("perm") or ()))


@_op("Transpose", reads=_transpose_reads,
     doc="the channel axis moves with the permutation (default: reversed)")
def transpose(ctx: RuleContext) -> None:
  x = ctx.node.inputs[0]
  d = ctx.dim(x)
  if d is None:
    return
  rank = ctx.graph.rank(x)
  perm = ctx.node.attrs.get("perm") or (tuple(range(rank - 1, -1, -1)) if rank else None)
  if perm is None:
    ctx.block(d.units, f"{describe(ctx.node)}: permutation unknown")
    return
  ctx.set_dim(_out(ctx), ChannelDim(list(perm).index(d.axis), d.units))


_SOFTMAX = ("Softmax", "LogSoftmax", "Hardmax")


@_op(*_SOFTMAX, until=13, doc="the input is flattened to 2-D at axis (default 1) and each row "
     "normalised: channels at or after axis block")
def softmax_rows(ctx: RuleContext) -> None:
  base.normalise_along(ctx, ctx.node.attrs.get("axis", 1), lambda c, axis: c >= axis)


@_op(*_SOFTMAX, since=13, doc="normalises along axis (default -1): channels on another axis "
     "pass, on that axis block")
def softmax(ctx: RuleContext) -> None:
  base.normalise_along(ctx, ctx.node.attrs.get("axis", -1), lambda c, axis: c == axis)


def _resize(ctx: RuleContext, scales_t: Optional[str], sizes_t: Optional[str],
            scales_attr=None) -> None:
  x = ctx.node.inputs[0]
  d = ctx.dim(x)
  if d is None:
    return
  if ctx.node.attrs.get("axes"):
    ctx.block(d.units, f"{describe(ctx.node)}: resizes named axes")
    return
  if sizes_t is not None:
    if base.const_ints(ctx, sizes_t) is None:
      ctx.block(d.units, f"{describe(ctx.node)}: sizes not constant")
      return
    ctx.set_dim(_out(ctx), d)
    ctx.set_shape_entry(sizes_t, d.axis, _out(ctx), ctx.node.name)
    return
  scales = (ctx.graph.constants[scales_t].reshape(-1) if scales_t and
            ctx.graph.is_const(scales_t) else scales_attr)
  if scales is None or len(scales) <= d.axis or scales[d.axis] != 1:
    ctx.block(d.units, f"{describe(ctx.node)}: scales the channel axis, or scales unknown")
    return
  ctx.set_dim(_out(ctx), d)


@_op("Upsample", until=9, doc="scales attribute of 1 on the channels: channels pass through")
def upsample_attr(ctx: RuleContext) -> None:
  _resize(ctx, None, None, ctx.node.attrs.get("scales"))


@_op("Upsample", since=9, doc="scales input of 1 on the channels: channels pass through")
@_op("Resize", since=10, until=11, doc="scales input (1 on the channels): channels pass through")
def resize_v10(ctx: RuleContext) -> None:
  _resize(ctx, _input(ctx, 1), None)


@_op("Resize", since=11, doc="roi, scales, sizes inputs: scale 1 on the channels passes them; "
     "constant sizes have their channel entry rewritten")
def resize(ctx: RuleContext) -> None:
  _resize(ctx, _input(ctx, 2), _input(ctx, 3))


def _slice(ctx: RuleContext, starts, ends, axes, steps, entry, reads=None) -> None:
  """Constant slices. One of the channel axis with step 1 takes a run of channels:
  its constant bounds become the kept counts before them (`entry(name, k, by)`
  records that for bound `name` of axis number k). Bounds computed at run time
  from the channel count (torch's chunk: k * ((C + n - 1) // n)) follow pruning
  by themselves when the channels are cut into n equal blocks that keep the same
  positions; `reads` maps (name, k) to the function of the count they compute."""
  x = ctx.node.inputs[0]
  d = ctx.dim(x)
  if d is None:
    return
  rank = ctx.graph.rank(x)
  axes = axes or (list(range(len(starts))) if starts else None)
  steps = steps or [1] * len(axes or ())
  reads = reads or {}
  if starts is None or ends is None or axes is None or rank is None:
    ctx.block(d.units, f"{describe(ctx.node)}: slice bounds are not constant")
    return
  for k, (a, s, e, st) in enumerate(zip(axes, starts, ends, steps)):
    if base.normalise_axis(a, rank) != d.axis:
      if ("starts", k) in reads or ("ends", k) in reads:
        ctx.block(d.units, f"{describe(ctx.node)}: bounds of another axis read the channels")
        return
      continue
    start, stop, step = slice(s, e, st).indices(len(d))
    if step != 1 or stop <= start:
      ctx.block(d.units, f"{describe(ctx.node)}: slices the channel axis with a step, "
                "backwards or to nothing")
      return
    if (start, stop) == (0, len(d)) and not reads:
      continue
    units = d.units[start:stop]
    ctx.need(units, f"{describe(ctx.node)}: takes channels {start}-{stop - 1}")
    read_start, read_stop = reads.get(("starts", k)), reads.get(("ends", k))
    if read_start or read_stop:
      blocks = _chunks(len(d), start, stop, read_start, read_stop)
      if blocks is None:
        ctx.block(d.units, f"{describe(ctx.node)}: bounds read from the channel count do "
                  "not follow equal chunks of it")
        return
      base.couple_blocks(ctx, d.units, blocks)
    if start and not read_start:
      entry("starts", k, ctx.virtual(f"before{k}", ChannelDim(d.axis, d.units[:start])))
    if -len(d) <= e <= len(d) and not read_stop:
      entry("ends", k, ctx.virtual(f"upto{k}", ChannelDim(d.axis, d.units[:stop])))
    d = ChannelDim(d.axis, units)
  ctx.set_dim(_out(ctx), d)


def _chunks(channels: int, start: int, stop: int, read_start, read_stop) -> Optional[int]:
  """The fewest equal blocks n of the channels such that, when every block keeps
  the same positions (m each), the run-time bounds give start and stop in kept
  channels for every m: start * m / (channels / n), and likewise stop."""
  for n in range(1, channels + 1):
    per = channels // n
    if channels % n or start % per or stop % per:
      continue
    ok = all((read_start is None or read_start(n * m) == start // per * m) and
             (read_stop is None or read_stop(n * m) == stop // per * m)
             for m in range(1, per + 1))
    if ok:
      return n
  return None


@_op("Slice", until=10, doc="starts/ends/axes attributes: crops pass channels through; a run "
     "of channels (torch chunk) is followed, its bounds rewritten")
def slice_attr(ctx: RuleContext) -> None:
  def entry(name, k, by):
    ctx.set_attr_count(name, by, index=k)
  _slice(ctx, _attr_ints(ctx, "starts"), _attr_ints(ctx, "ends"), _attr_ints(ctx, "axes"),
         None, entry)


@_op("Slice", since=10, doc="starts/ends/axes/steps inputs: as before opset 10; bounds "
     "computed from the channel count at run time (torch chunk) follow equal chunks")
def slice_input(ctx: RuleContext) -> None:
  for i in (3, 4):
    if _input(ctx, i) is not None and _input_ints(ctx, i) is None:
      _slice(ctx, None, None, None, None, None)
      return
  d = ctx.dim(ctx.node.inputs[0])
  bounds, reads = [], {}
  for i, name in ((1, "starts"), (2, "ends")):
    values = _input_ints(ctx, i)
    if values is None and d is not None:
      entries = _shape_reads(ctx, _input(ctx, i))
      if entries is None or any(v is None for v, _, _ in entries):
        values = None
      else:
        values = [v for v, _, _ in entries]
        for k, (_, src, fn) in enumerate(entries):
          if src is not None:
            found = _channel_reads(ctx, [(src[0], src[1], fn)], d)
            if found is None:
              values = None
              break
            if found:
              reads[(name, k)] = fn
    bounds.append(values)

  def entry(name, k, by):
    ctx.set_shape_entry(_input(ctx, 1 if name == "starts" else 2), k, by, ctx.node.name)
  _slice(ctx, bounds[0], bounds[1], _input_ints(ctx, 3), _input_ints(ctx, 4), entry, reads)


@_op("Shape", "Size", "Constant", "ConstantOfShape",
     doc="no channels; shapes read at run time follow pruning by themselves")
def no_channels(ctx: RuleContext) -> None:
  # Shapes read at run time follow pruning; what is built from them is checked
  # where it meets channels (see the Reshape rule).
  del ctx


@_op("Split", until=13, doc="split attribute (or equal parts): along the channels each output "
     "takes its run and the sizes become the kept counts; equal parts stay equal")
def split_attr(ctx: RuleContext) -> None:
  base.split(ctx, ctx.node.inputs[0], ctx.node.attrs.get("axis", 0), _attr_ints(ctx, "split"),
             lambda k, by: ctx.set_attr_count("split", by, index=k))


@_op("Split", since=13, doc="split input (or equal parts; num_outputs from 18): as before "
     "opset 13")
def split_input(ctx: RuleContext) -> None:
  sizes_t = _input(ctx, 1)
  if sizes_t is not None and _input_ints(ctx, 1) is None:
    base.block_inputs(ctx, f"{describe(ctx.node)}: split sizes are not constant")
    return
  base.split(ctx, ctx.node.inputs[0], ctx.node.attrs.get("axis", 0), _input_ints(ctx, 1),
             lambda k, by: ctx.set_shape_entry(sizes_t, k, by, ctx.node.name))


@_op("Gather", doc="constant 1-D indices on the channel axis: the gathered channels are followed "
     "and the indices renumbered; on another axis channels pass")
def gather(ctx: RuleContext) -> None:
  base.gather(ctx, ctx.node.inputs[0], ctx.node.inputs[1], ctx.node.attrs.get("axis", 0))


@_op("DepthToSpace", doc="channel blocks move into space: the block_size^2 channels that "
     "become one output channel are removed together (DCR and CRD modes)")
def depth_to_space(ctx: RuleContext) -> None:
  base.depth_to_space(ctx, 1, int(ctx.node.attrs.get("blocksize", 1)),
                      crd=ctx.node.attrs.get("mode", "DCR") == "CRD")


@_op("SpaceToDepth", doc="space moves into channels: output channel k*C + c is input channel c, "
     "so each input channel is followed into its block_size^2 copies")
def space_to_depth(ctx: RuleContext) -> None:
  base.space_to_depth(ctx, 1, int(ctx.node.attrs.get("blocksize", 1)))


@_op("GroupNormalization", since=21, doc="whole groups go (scale and bias per channel are "
     "sliced), num_groups rewritten")
def group_norm(ctx: RuleContext) -> None:
  x = ctx.node.inputs[0]
  d = ctx.dim(x)
  if d is None:
    return
  groups = int(ctx.node.attrs.get("num_groups", 0))
  params = [t for t in ctx.node.inputs[1:3] if t]
  if d.axis != 1 or groups < 1 or len(d) % groups or not all(
      ctx.graph.is_const(p) for p in params):
    ctx.block(d.units, f"{describe(ctx.node)}: channels not on axis 1, groups that do not "
              "divide them, or parameters that are not constant")
    return
  # Channels normalised together go together: a unit is a whole group.
  reps = base.coarsen(ctx, d.units, groups)
  ctx.set_attr_count("num_groups", ctx.virtual("groups", ChannelDim(1, reps)))
  for role, p in zip((base.SCALE, base.PARAM), params):
    ctx.slice_const(p, 0, _out(ctx), role)
  ctx.set_dim(_out(ctx), d)


@_op("InstanceNormalization", doc="normalises each channel alone: scale and bias sliced")
def instance_norm(ctx: RuleContext) -> None:
  d = ctx.dim(ctx.node.inputs[0])
  if d is None:
    return
  params = ctx.node.inputs[1:3]
  if d.axis != 1 or not all(ctx.graph.is_const(p) and ctx.graph.shape(p) == (len(d),)
                            for p in params):
    ctx.block(d.units, f"{describe(ctx.node)}: channels not on axis 1, or parameters that are "
              "not per-channel constants")
    return
  ctx.slice_const(params[0], 0, _out(ctx), base.SCALE)
  ctx.slice_const(params[1], 0, _out(ctx), base.PARAM)
  ctx.set_dim(_out(ctx), d)


@_op("Einsum", linear=desc.einsum_linear,
     doc="x times a constant 2-D weight contracting one axis (a dense layer or 1x1 "
         "convolution written as einsum): as MatMul, on whichever axes the equation names")
def einsum(ctx: RuleContext) -> None:
  base.einsum(ctx)
