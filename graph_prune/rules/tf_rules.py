"""Channel rules for TensorFlow op types, one small function per op kind.

Layouts come from each node's `data_format` attribute (NHWC default); weights
are HWIO (Conv2D), HWCM (DepthwiseConv2dNative) and [in, out] (MatMul).
Adding an op is adding a rule here; an op without a rule blocks its channels.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from graph_prune.rules import base
from graph_prune.rules.base import ChannelDim, RuleContext, describe

RULES, _rule = base.registry()
_out = base.output


def _channel_axis(ctx: RuleContext, rank: int = 4) -> int:
  fmt = ctx.node.attrs.get("data_format", "NHWC")
  return 1 if fmt.startswith("NC") else rank - 1


@_rule("Conv2D")
def conv2d(ctx: RuleContext) -> None:
  x, w = ctx.node.inputs[:2]
  axis = _channel_axis(ctx)
  if not ctx.graph.is_const(w):
    base.block_inputs(ctx, f"{describe(ctx.node)}: filter is not a constant")
    return
  kh, kw, cin, cout = ctx.graph.constants[w].shape
  xshape = ctx.graph.shape(x)
  groups = 1
  if xshape is not None and xshape[axis] is not None:
    groups = xshape[axis] // cin
    if xshape[axis] % cin or groups < 1:
      base.block_inputs(ctx, f"{describe(ctx.node)}: input has {xshape[axis]} channels, "
                        f"filter expects a multiple of {cin}")
      return
  d = ctx.dim(x)
  if groups != 1:
    reason = (f"{describe(ctx.node)}: grouped convolution ({groups} groups) needs "
              "channels removed evenly per group; left whole")
    # Its outputs get no channel elements: nothing downstream can prune them.
    if d is not None:
      ctx.block(d.units, reason)
    return
  if d is not None:
    ctx.slice_const(w, 2, x, base.SINK)
  ctx.new_source(_out(ctx), axis, cout, w, 3)


@_rule("DepthwiseConv2dNative")
def depthwise(ctx: RuleContext) -> None:
  x, w = ctx.node.inputs[:2]
  if not ctx.graph.is_const(w):
    base.block_inputs(ctx, f"{describe(ctx.node)}: filter is not a constant")
    return
  d = ctx.dim(x)
  if d is None:
    return
  multiplier = ctx.graph.constants[w].shape[3]
  ctx.slice_const(w, 2, x, base.SINK)
  # Output channel c*M + m comes from input channel c.
  ctx.set_dim(_out(ctx), ChannelDim(_channel_axis(ctx), np.repeat(d.units, multiplier)))


@_rule("MatMul")
def matmul(ctx: RuleContext) -> None:
  a, b = ctx.node.inputs[:2]
  attrs = ctx.node.attrs
  if attrs.get("transpose_a") or not ctx.graph.is_const(b) or ctx.graph.is_const(a):
    base.block_inputs(ctx, f"{describe(ctx.node)}: only x @ constant weights is supported")
    return
  in_axis, out_axis = (1, 0) if attrs.get("transpose_b") else (0, 1)
  d = ctx.dim(a)
  if d is not None:
    if d.axis != 1:
      # Channels on the rows are batch-like here: a @ W mixes nothing across them,
      # but W's rows are indexed by a's columns, not by these channels.
      ctx.block(d.units, f"{describe(ctx.node)}: channels are not the contracted axis")
    else:
      ctx.slice_const(b, in_axis, a, base.SINK)
  ctx.new_source(_out(ctx), 1, ctx.graph.constants[b].shape[out_axis], b, out_axis)


@_rule("BiasAdd")
def bias_add(ctx: RuleContext) -> None:
  x, b = ctx.node.inputs[:2]
  d = ctx.dim(x)
  if d is None:
    return
  if not ctx.graph.is_const(b):
    base.block_inputs(ctx, f"{describe(ctx.node)}: bias is not a constant")
    return
  ctx.slice_const(b, 0, _out(ctx), base.PARAM)
  ctx.set_dim(_out(ctx), d)


@_rule("FusedBatchNorm", "FusedBatchNormV2", "FusedBatchNormV3")
def fused_batch_norm(ctx: RuleContext) -> None:
  x = ctx.node.inputs[0]
  d = ctx.dim(x)
  if d is None:
    return
  params = ctx.node.inputs[1:5]
  if d.axis != _channel_axis(ctx, ctx.graph.rank(x) or 4):
    ctx.block(d.units, f"{describe(ctx.node)}: normalises an axis other than the channels")
    return
  if not all(ctx.graph.is_const(p) and ctx.graph.shape(p) == (len(d),) for p in params):
    ctx.block(d.units, f"{describe(ctx.node)}: parameters are not per-channel constants")
    return
  if ctx.node.attrs.get("is_training"):
    ctx.block(d.units, f"{describe(ctx.node)}: batch-norm in training mode")
    return
  for role, p in zip((base.SCALE, base.PARAM, base.PARAM, base.PARAM), params):
    ctx.slice_const(p, 0, _out(ctx), role)
  ctx.set_dim(_out(ctx), d)


_UNARY = ("Relu", "Relu6", "Elu", "Selu", "Sigmoid", "Tanh", "LeakyRelu", "Softplus",
          "Softsign", "Erf", "Erfc", "Neg", "Abs", "Square", "Sqrt", "Rsqrt", "Exp", "Log",
          "Log1p", "Identity", "Cast", "StopGradient", "Floor", "Ceil", "Round", "Sign",
          "Reciprocal", "Inv", "PreventGradient", "Snapshot", "CheckNumerics")


@_rule(*_UNARY)
def unary(ctx: RuleContext) -> None:
  base.pass_through(ctx, ctx.node.inputs[0], _out(ctx))


@_rule("Add", "AddV2", "Sub", "Mul", "RealDiv", "Div", "DivNoNan", "Maximum", "Minimum",
       "SquaredDifference", "Pow", "AddN", "ClipByValue")
def binary(ctx: RuleContext) -> None:
  base.elementwise(ctx, list(ctx.node.inputs), _out(ctx))


@_rule("Pad", "PadV2", "MirrorPad")
def pad(ctx: RuleContext) -> None:
  x, paddings = ctx.node.inputs[:2]
  d = ctx.dim(x)
  if d is None:
    return
  if not ctx.graph.is_const(paddings):
    ctx.block(d.units, f"{describe(ctx.node)}: paddings are not constant")
    return
  if np.any(ctx.graph.constants[paddings][d.axis] != 0):
    ctx.block(d.units, f"{describe(ctx.node)}: pads the channel axis")
    return
  ctx.set_dim(_out(ctx), d)


@_rule("MaxPool", "AvgPool", "MaxPoolV2")
def pool(ctx: RuleContext) -> None:
  d = ctx.dim(ctx.node.inputs[0])
  if d is None:
    return
  if ctx.node.op == "MaxPoolV2":  # window and strides are inputs, not attributes
    ksize, strides = (base.const_ints(ctx, t) for t in ctx.node.inputs[1:3])
  else:
    ksize, strides = ctx.node.attrs.get("ksize"), ctx.node.attrs.get("strides")
  if ksize is None or strides is None or len(ksize) <= d.axis or len(strides) <= d.axis:
    ctx.block(d.units, f"{describe(ctx.node)}: window or strides unknown")
    return
  if ksize[d.axis] != 1 or strides[d.axis] != 1:
    ctx.block(d.units, f"{describe(ctx.node)}: pools across channels")
    return
  ctx.set_dim(_out(ctx), d)


@_rule("Mean", "Max", "Min", "Sum", "Prod")
def reduce(ctx: RuleContext) -> None:
  x, axes_t = ctx.node.inputs[:2]
  base.reduce(ctx, x, base.const_ints(ctx, axes_t), ctx.node.attrs.get("keep_dims", False))


@_rule("ConcatV2")
def concat(ctx: RuleContext) -> None:
  *values, axis_t = ctx.node.inputs
  axis = base.const_ints(ctx, axis_t)
  base.concat(ctx, values, axis[0] if axis else None)


@_rule("Squeeze")
def squeeze(ctx: RuleContext) -> None:
  base.squeeze(ctx, ctx.node.inputs[0], list(ctx.node.attrs.get("squeeze_dims") or ()))


@_rule("ExpandDims")
def expand_dims(ctx: RuleContext) -> None:
  x, axis_t = ctx.node.inputs[:2]
  d = ctx.dim(x)
  if d is None:
    return
  axis = base.const_ints(ctx, axis_t)
  rank = ctx.graph.rank(x)
  if axis is None or rank is None:
    ctx.block(d.units, f"{describe(ctx.node)}: axis or rank unknown")
    return
  a = base.normalise_axis(axis[0], rank + 1)
  ctx.set_dim(_out(ctx), ChannelDim(d.axis + 1 if a <= d.axis else d.axis, d.units))


@_rule("Transpose")
def transpose(ctx: RuleContext) -> None:
  x, perm_t = ctx.node.inputs[:2]
  d = ctx.dim(x)
  if d is None:
    return
  perm = base.const_ints(ctx, perm_t)
  if perm is None:
    ctx.block(d.units, f"{describe(ctx.node)}: permutation is not constant")
    return
  ctx.set_dim(_out(ctx), ChannelDim(perm.index(d.axis), d.units))


@_rule("Softmax", "LogSoftmax")
def softmax(ctx: RuleContext) -> None:
  x = ctx.node.inputs[0]
  d = ctx.dim(x)
  if d is None:
    return
  if d.axis == (ctx.graph.rank(x) or 0) - 1:
    ctx.block(d.units, f"{describe(ctx.node)}: normalises across channels")
    return
  ctx.set_dim(_out(ctx), d)


@_rule("ResizeBilinear", "ResizeNearestNeighbor", "ResizeBicubic", "ResizeArea")
def resize(ctx: RuleContext) -> None:
  d = ctx.dim(ctx.node.inputs[0])
  if d is not None and d.axis != 3:
    ctx.block(d.units, f"{describe(ctx.node)}: channels not on the last axis")
    return
  base.pass_through(ctx, ctx.node.inputs[0], _out(ctx))


def _batch_slice(ctx: RuleContext, tensor: str) -> bool:
  """True for StridedSlice(Shape(x), [0], [1], [1]) with shrink: x's batch size."""
  node = ctx.graph.producer(tensor)
  if node is None or node.op != "StridedSlice" or node.attrs.get("shrink_axis_mask") != 1:
    return False
  src, begin, end, strides = node.inputs[:4]
  producer = ctx.graph.producer(src)
  return (producer is not None and producer.op == "Shape" and
          [base.const_ints(ctx, t) for t in (begin, end, strides)] == [[0], [1], [1]])


def _reshape_target(ctx: RuleContext, shape_t: str):
  """The target shape and, per entry, the (constant, position, reading node) that holds it.

  Keras 3 writes Flatten as Reshape(x, Pack(batch, n)) with the batch size read
  from Shape(x) at run time; that form is followed as well as a constant shape.
  """
  target = base.const_ints(ctx, shape_t)
  if target is not None:
    return target, [(shape_t, j, ctx.node.name) for j in range(len(target))]
  pack = ctx.graph.producer(shape_t)
  if pack is None or pack.op != "Pack" or pack.attrs.get("axis", 0) != 0:
    return None, None
  target, refs = [], []
  for j, t in enumerate(pack.inputs):
    value = base.const_ints(ctx, t)
    if value is not None and len(value) == 1:
      target.append(value[0])
      refs.append((t, 0, pack.name))
    elif j == 0 and _batch_slice(ctx, t):
      target.append(-1)
      refs.append(None)
    else:
      return None, None
  return target, refs


def _gathered_axes(ctx: RuleContext, tensor: str, x: str) -> Optional[list[int]]:
  """Axes of x whose sizes `tensor` holds, for GatherV2(Shape(x), const, 0) and
  Prod over such a gather (Tensordot's shape arithmetic); else None."""
  node = ctx.graph.producer(tensor)
  if node is not None and node.op == "Prod":
    if base.const_ints(ctx, node.inputs[1]) != [0]:
      return None
    node = ctx.graph.producer(node.inputs[0])
  if node is None or node.op != "GatherV2" or base.const_ints(ctx, node.inputs[2]) != [0]:
    return None
  shape_op = ctx.graph.producer(node.inputs[0])
  if shape_op is None or shape_op.op != "Shape" or shape_op.inputs[0] != x:
    return None
  return base.const_ints(ctx, node.inputs[1])


def _last_entry_is_channels(ctx: RuleContext, shape_t: str, x: str, channels: int):
  """Whether the dynamic target shape provably ends in the channel count.

  Returns (proved, (const, position, reader) to rewrite or None).
  """
  node = ctx.graph.producer(shape_t)
  if node is None:
    return False, None
  rank = ctx.graph.rank(x)
  if node.op == "Pack" and node.attrs.get("axis", 0) == 0:
    last = node.inputs[-1]
    value = base.const_ints(ctx, last)
    if value is not None:
      return value == [channels], (last, 0, node.name)
    return _gathered_axes(ctx, last, x) == [rank - 1], None
  if node.op == "ConcatV2" and base.const_ints(ctx, node.inputs[-1]) in ([0], [-1]):
    last = node.inputs[-2]
    value = base.const_ints(ctx, last)
    if value is not None:
      return bool(value) and value[-1] == channels, (last, len(value) - 1, node.name)
    axes = _gathered_axes(ctx, last, x)
    return bool(axes) and axes[-1] == rank - 1, None
  return False, None


def _reshape_channels_last(ctx: RuleContext, x: str, shape_t: str, d: ChannelDim) -> bool:
  """Reshape with a run-time target (Tensordot): channels stay last when they are
  last in the input and the target provably ends in the channel count."""
  out_rank = ctx.graph.rank(_out(ctx))
  if d.axis != (ctx.graph.rank(x) or 0) - 1 or out_rank is None:
    return False
  proved, ref = _last_entry_is_channels(ctx, shape_t, x, len(d))
  if not proved:
    return False
  ctx.set_dim(_out(ctx), ChannelDim(out_rank - 1, d.units))
  if ref is not None:
    ctx.set_shape_entry(ref[0], ref[1], _out(ctx), ref[2])
  return True


@_rule("Reshape")
def reshape(ctx: RuleContext) -> None:
  x, shape_t = ctx.node.inputs[:2]
  d = ctx.dim(x)
  if d is None:
    return
  target, refs = _reshape_target(ctx, shape_t)
  in_shape = ctx.graph.shape(x)
  if target is None and _reshape_channels_last(ctx, x, shape_t, d):
    return
  if target is None or in_shape is None:
    ctx.block(d.units, f"{describe(ctx.node)}: target shape is neither constant nor provably "
              "channels-last")
    return
  base.follow_reshape(ctx, d, in_shape, target, refs, _out(ctx))


@_rule("StridedSlice")
def strided_slice(ctx: RuleContext) -> None:
  """Crops (Keras Cropping2D) that take every channel pass them through."""
  x, begin_t, end_t, strides_t = ctx.node.inputs[:4]
  d = ctx.dim(x)
  if d is None:
    return
  attrs = ctx.node.attrs
  begin, end, strides = (base.const_ints(ctx, t) for t in (begin_t, end_t, strides_t))
  a = d.axis
  if (begin is None or end is None or strides is None or len(begin) != ctx.graph.rank(x)
      or any(attrs.get(m, 0) for m in ("ellipsis_mask", "new_axis_mask", "shrink_axis_mask"))):
    ctx.block(d.units, f"{describe(ctx.node)}: only constant slices without axis changes")
    return
  whole = ((attrs.get("begin_mask", 0) >> a & 1 or begin[a] == 0) and
           (attrs.get("end_mask", 0) >> a & 1 or end[a] >= len(d)) and strides[a] == 1)
  if not whole:
    ctx.block(d.units, f"{describe(ctx.node)}: slices the channel axis")
    return
  ctx.set_dim(_out(ctx), d)


@_rule("Shape", "ShapeN", "Size", "Rank")
def shape_read(ctx: RuleContext) -> None:
  # A shape read at run time follows pruning by itself. What is built from it
  # is checked where it is used: a Reshape follows only target shapes it can
  # prove (below); a tensor created from it carries no channels, so combining
  # it with channels blocks in the elementwise rule.
  del ctx


@_rule("NoOp", "Placeholder", "PlaceholderWithDefault", "Const")
def no_channels(ctx: RuleContext) -> None:
  if ctx.node.op == "PlaceholderWithDefault":
    base.block_inputs(ctx, f"{describe(ctx.node)}: default value of an input")
