"""TensorFlow op descriptions: one channel rule per op kind, with the op's weights,
kernel and batch-norm statistics where it has them.

Layouts come from each node's `data_format` attribute (NHWC default); weights
are HWIO (Conv2D), HWCM (DepthwiseConv2dNative) and [in, out] (MatMul).
Adding an op is adding a description here; an op without one blocks its channels.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from graph_prune.graph import view
from graph_prune.ops import channels as base
from graph_prune.ops import desc
from graph_prune.ops.channels import ChannelDim, RuleContext, describe

REGISTRY = desc.Registry("tensorflow")
_op = REGISTRY.op
_out = base.output


def _channel_axis(ctx: RuleContext, rank: int = 4) -> int:
  fmt = ctx.node.attrs.get("data_format", "NHWC")
  return 1 if fmt.startswith("NC") else rank - 1


def _conv_linear(g: view.GraphView, node: view.Node):
  """Conv2D (HWIO) and Conv3D (DHWIO): input channels on axis -2, output on -1."""
  w = g.constants.get(node.inputs[1])
  if w is None or w.ndim not in (4, 5):
    return None
  first = node.attrs.get("data_format", "NHWC").startswith("NC")
  xshape = g.shape(node.inputs[0])
  cin = xshape[1 if first else -1] if xshape is not None and len(xshape) == w.ndim else None
  groups = cin // w.shape[-2] if cin and w.shape[-2] and cin % w.shape[-2] == 0 else 1
  return desc.spatial_linear(node, w, -1, -2, first, int(w.shape[-2]), groups=groups)


@_op("Conv2D", linear=_conv_linear,
     doc="creates channels (filters, HWIO axis 3); input channels cut its axis 2; grouped "
         "(also Keras's, inside an XLA function call): every group loses the same positions")
@_op("Conv3D", linear=_conv_linear,
     doc="creates channels (filters, DHWIO axis 4); input channels cut its axis 3")
def conv(ctx: RuleContext) -> None:
  x, w = ctx.node.inputs[:2]
  if not base.constant(ctx, w, "filter"):
    return
  rank = ctx.graph.constants[w].ndim
  axis = _channel_axis(ctx, rank)
  cin, cout = ctx.graph.constants[w].shape[-2:]
  xshape = ctx.graph.shape(x)
  groups = 1
  if xshape is not None and len(xshape) == rank and xshape[axis] is not None:
    groups = xshape[axis] // cin
    if xshape[axis] % cin or groups < 1:
      base.block_inputs(ctx, f"{describe(ctx.node)}: input has {xshape[axis]} channels, "
                        f"filter expects a multiple of {cin}")
      return
  d = ctx.dim(x)
  if groups == 1:
    if d is not None:
      ctx.slice_const(w, rank - 2, x, base.SINK)
    ctx.new_source(_out(ctx), axis, cout, w, rank - 1)
    return
  # Grouped (the input has a multiple of the filter's input channels; Keras writes
  # it inside an XLA function call): group b reads input block b and writes output
  # block b; position k of every block is coupled, so the group count stays.
  if cout % groups:
    base.block_inputs(ctx, f"{describe(ctx.node)}: {cout} filters for {groups} groups")
    return
  if d is not None:
    first = base.couple_blocks(ctx, d.units, groups)
    ctx.slice_const(w, rank - 2, ctx.virtual("group_in", ChannelDim(axis, first)), base.SINK)
  out = ctx.new_source(_out(ctx), axis, cout, w, rank - 1)
  base.couple_blocks(ctx, out.units, groups)


def _depthwise_linear(g: view.GraphView, node: view.Node):
  w = g.constants.get(node.inputs[1])
  if w is None or w.ndim != 4:
    return None
  first = node.attrs.get("data_format", "NHWC").startswith("NC")
  return desc.spatial_linear(node, w, 2, 3, first, 1, groups=int(w.shape[2]),
                             multiplier=int(w.shape[3]), multiplier_axis=3)


@_op("DepthwiseConv2dNative", linear=_depthwise_linear,
     doc="channel c becomes outputs c*M..c*M+M-1 (multiplier M); filters cut on axis 2")
def depthwise(ctx: RuleContext) -> None:
  x, w = ctx.node.inputs[:2]
  if not base.constant(ctx, w, "filter"):
    return
  d = ctx.dim(x)
  if d is None:
    return
  multiplier = ctx.graph.constants[w].shape[3]
  ctx.slice_const(w, 2, x, base.SINK)
  # Output channel c*M + m comes from input channel c.
  ctx.set_dim(_out(ctx), ChannelDim(_channel_axis(ctx), np.repeat(d.units, multiplier)))


def _matmul_linear(g: view.GraphView, node: view.Node):
  if node.attrs.get("transpose_a"):
    return None
  return desc.dense_linear(g, node, bool(node.attrs.get("transpose_b")))


@_op("MatMul", linear=_matmul_linear,
     doc="x @ constant W creates channels (W's columns); x's columns cut W's rows "
         "(transpose_b respected); channels on x's rows block")
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


@_op("BiasAdd", affine="shift", doc="per-channel bias, sliced")
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


def _fused_bn_norm(g: view.GraphView, node: view.Node):
  scale, shift, mean, variance = node.inputs[1:5]
  fmt = node.attrs.get("data_format", "NHWC")
  rank = g.rank(node.inputs[0]) or len(fmt)
  return desc.Norm(scale, shift, mean, variance, 1 if fmt.startswith("NC") else rank - 1,
                   float(node.attrs.get("epsilon", 1e-4)))


@_op("FusedBatchNorm", "FusedBatchNormV2", "FusedBatchNormV3", norm=_fused_bn_norm,
     doc="inference batch norm: scale, offset, mean, variance sliced; training mode blocks")
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


@_op(*_UNARY, doc="elementwise on one tensor: channels pass through")
def unary(ctx: RuleContext) -> None:
  base.pass_through(ctx, ctx.node.inputs[0], _out(ctx))


@_op("Add", "AddV2", affine="shift",
     doc="broadcasting elementwise: computed operands couple their channels (residual "
         "adds), per-channel constants are sliced, anything else blocks")
@_op("Mul", affine="scale", doc="as Add; a per-channel constant factor is a scale")
@_op("Sub", "RealDiv", "Div", "DivNoNan", "Maximum", "Minimum", "SquaredDifference", "Pow",
     "AddN", "ClipByValue", doc="broadcasting elementwise, as Add")
def binary(ctx: RuleContext) -> None:
  base.elementwise(ctx, list(ctx.node.inputs), _out(ctx))


@_op("Pad", "PadV2", "MirrorPad",
     doc="constant paddings off the channel axis pass channels through; constant padding "
         "of the channel axis (Pad, PadV2) adds fixed channels")
def pad(ctx: RuleContext) -> None:
  x, paddings = ctx.node.inputs[:2]
  d = ctx.dim(x)
  if d is None:
    return
  if not ctx.graph.is_const(paddings):
    ctx.block(d.units, f"{describe(ctx.node)}: paddings are not constant")
    return
  before, after = (int(v) for v in ctx.graph.constants[paddings][d.axis])
  base.pad_channels(ctx, d, before, after, ctx.node.op != "MirrorPad")


@_op("MaxPool", "AvgPool", "MaxPoolV2",
     doc="spatial pooling passes channels through; a window over channels blocks")
@_op("MaxPool3D", "AvgPool3D", doc="as MaxPool, over depth, height and width")
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


@_op("Mean", "Max", "Min", "Sum", "Prod",
     doc="reduction over constant axes other than the channels; the channel axis moves")
def reduce(ctx: RuleContext) -> None:
  x, axes_t = ctx.node.inputs[:2]
  base.reduce(ctx, x, base.const_ints(ctx, axes_t), ctx.node.attrs.get("keep_dims", False))


@_op("ConcatV2", doc="along the channels: the operands' channels laid end to end (the same "
     "tensor twice keeps two ranges); along another axis: the operands couple")
def concat(ctx: RuleContext) -> None:
  *values, axis_t = ctx.node.inputs
  axis = base.const_ints(ctx, axis_t)
  base.concat(ctx, values, axis[0] if axis else None)


@_op("Squeeze", doc="the channel axis moves; squeezing it blocks")
def squeeze(ctx: RuleContext) -> None:
  base.squeeze(ctx, ctx.node.inputs[0], list(ctx.node.attrs.get("squeeze_dims") or ()))


@_op("ExpandDims", doc="the channel axis moves")
def expand_dims(ctx: RuleContext) -> None:
  x, axis_t = ctx.node.inputs[:2]
  axis = base.const_ints(ctx, axis_t)
  found = base.dim_and_rank(ctx, x, axis is not None, "axis or rank unknown")
  if found is None:
    return
  d, rank = found
  a = base.normalise_axis(axis[0], rank + 1)
  ctx.set_dim(_out(ctx), ChannelDim(d.axis + 1 if a <= d.axis else d.axis, d.units))


@_op("Transpose", doc="constant permutation: the channel axis moves")
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


@_op("Softmax", "LogSoftmax", doc="over another axis: channels pass; over the channels: blocks")
def softmax(ctx: RuleContext) -> None:
  base.normalise_along(ctx, -1, lambda c, axis: c == axis)


@_op("ResizeBilinear", "ResizeNearestNeighbor", "ResizeBicubic", "ResizeArea",
     doc="spatial resize (NHWC): channels pass through")
def resize(ctx: RuleContext) -> None:
  base.pass_on_axis(ctx, ctx.node.inputs[0], _out(ctx), 3, "the last axis")


def _batch_slice(ctx: RuleContext, tensor: str) -> bool:
  """True for StridedSlice(Shape(x), [0], [1], [1]) with shrink: x's batch size."""
  node = ctx.graph.producer(tensor)
  if node is None or node.op != "StridedSlice" or node.attrs.get("shrink_axis_mask") != 1:
    return False
  src, begin, end, strides = node.inputs[:4]
  producer = ctx.graph.producer(src)
  return (producer is not None and producer.op == "Shape" and
          [base.const_ints(ctx, t) for t in (begin, end, strides)] == [[0], [1], [1]])


def _reshape_target(ctx: RuleContext, shape_t: str, reader: Optional[str] = None):
  """The target shape and, per entry, the (constant, position, reading node) that holds it
  (a constant target is read by `reader`, default the node the rule is for).

  Keras 3 writes Flatten as Reshape(x, Pack(batch, n)) with the batch size read
  from Shape(x) at run time; that form is followed as well as a constant shape.
  """
  target = base.const_ints(ctx, shape_t)
  if target is not None:
    return target, [(shape_t, j, reader or ctx.node.name) for j in range(len(target))]
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


@_op("Reshape", doc="constant target (or Keras's Pack of the batch size, or Tensordot's "
     "channels-last shape arithmetic): channels followed through merged axes (Flatten into "
     "a dense layer) and folded groups (whole groups go), the target's channel entry "
     "rewritten; Reshape-Transpose-Reshape channel shuffles followed through the permutation")
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
  if _shuffle(ctx, d, in_shape, target, refs):
    return
  base.follow_reshape(ctx, d, in_shape, target, refs, _out(ctx))


def _shuffle(ctx: RuleContext, d: ChannelDim, in_shape, target, refs) -> bool:
  """A channel shuffle starting at this Reshape: target splits the channel axis into
  (groups, C/groups), its only reader is a Transpose swapping the two, whose only
  reader is a Reshape back to the input's rank (see base.follow_shuffle)."""
  a = d.axis
  if len(target) != len(in_shape) + 1 or a + 1 >= len(target):
    return False
  groups, per = target[a], target[a + 1]
  if groups <= 1 or per not in (-1, len(d) // groups) or len(d) % groups:
    return False
  transpose = base.only_reader(ctx, _out(ctx), "Transpose")
  if transpose is None:
    return False
  perm = list(range(len(target)))
  perm[a], perm[a + 1] = a + 1, a
  if base.const_ints(ctx, transpose.inputs[1]) != perm:
    return False
  back = base.only_reader(ctx, transpose.outputs[0], "Reshape")
  if back is None:
    return False
  back_target, back_refs = _reshape_target(ctx, back.inputs[1], back.name)
  if (back_target is None or len(back_target) != len(in_shape) or
      back_target[a] not in (len(d), -1)):
    return False
  back_ref = back_refs[a] if back_target[a] != -1 else None
  base.follow_shuffle(ctx, d, groups, back.outputs[0], refs[a + 1] if per != -1 else None,
                      back_ref)
  return True


@_op("StridedSlice", doc="constant slices: crops pass channels through; a run of channels "
     "with stride 1 is followed, its bounds rewritten")
def strided_slice(ctx: RuleContext) -> None:
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
  masked_begin = attrs.get("begin_mask", 0) >> a & 1
  masked_end = attrs.get("end_mask", 0) >> a & 1
  start, stop, step = slice(None if masked_begin else begin[a],
                            None if masked_end else end[a], strides[a]).indices(len(d))
  if (start, stop, step) == (0, len(d), 1):
    ctx.set_dim(_out(ctx), d)
    return
  if step != 1 or stop <= start:
    ctx.block(d.units, f"{describe(ctx.node)}: slices the channel axis with a stride, "
              "backwards or to nothing")
    return
  units = d.units[start:stop]
  ctx.need(units, f"{describe(ctx.node)}: takes channels {start}-{stop - 1}")
  if start and not masked_begin:
    ctx.set_shape_entry(begin_t, a, ctx.virtual("before", ChannelDim(a, d.units[:start])),
                        ctx.node.name)
  if not masked_end and -len(d) <= end[a] <= len(d):
    ctx.set_shape_entry(end_t, a, ctx.virtual("upto", ChannelDim(a, d.units[:stop])),
                        ctx.node.name)
  ctx.set_dim(_out(ctx), ChannelDim(a, units))


@_op("Split", doc="equal parts: along the channels each output takes its run, and position i "
     "of every part is coupled so the parts stay equal")
def split(ctx: RuleContext) -> None:
  axis_t, x = ctx.node.inputs[:2]
  axis = base.const_ints(ctx, axis_t)
  base.split(ctx, x, axis[0] if axis else None, None, None)


@_op("SplitV", doc="constant size_splits: along the channels each output takes its run, the "
     "sizes become the kept counts")
def split_v(ctx: RuleContext) -> None:
  x, sizes_t, axis_t = ctx.node.inputs[:3]
  axis, sizes = base.const_ints(ctx, axis_t), base.const_ints(ctx, sizes_t)
  if sizes is None:
    base.block_inputs(ctx, f"{describe(ctx.node)}: split sizes are not constant")
    return
  base.split(ctx, x, axis[0] if axis else None, sizes,
             lambda k, by: ctx.set_shape_entry(sizes_t, k, by, ctx.node.name))


@_op("GatherV2", doc="constant 1-D indices on the channel axis: the gathered channels are "
     "followed and the indices renumbered; on another axis channels pass")
def gather(ctx: RuleContext) -> None:
  x, indices, axis_t = ctx.node.inputs[:3]
  if ctx.node.attrs.get("batch_dims", 0):
    base.block_inputs(ctx, f"{describe(ctx.node)}: batch_dims")
    return
  axis = base.const_ints(ctx, axis_t)
  base.gather(ctx, x, indices, axis[0] if axis else None)


@_op("DepthToSpace", doc="channel blocks move into space: the block_size^2 channels that "
     "become one output channel are removed together")
def depth_to_space(ctx: RuleContext) -> None:
  base.depth_to_space(ctx, _channel_axis(ctx), int(ctx.node.attrs.get("block_size", 1)))


@_op("SpaceToDepth", doc="space moves into channels: output channel k*C + c is input channel "
     "c, so each input channel is followed into its block_size^2 copies")
def space_to_depth(ctx: RuleContext) -> None:
  base.space_to_depth(ctx, _channel_axis(ctx), int(ctx.node.attrs.get("block_size", 1)))


@_op("SpaceToBatchND", "BatchToSpaceND",
     doc="spatial blocks to and from the batch (dilated convolution): channels after the "
         "blocked axes pass through")
def space_batch(ctx: RuleContext) -> None:
  x, block_t = ctx.node.inputs[:2]
  d = ctx.dim(x)
  if d is None:
    return
  block = base.const_ints(ctx, block_t)
  if block is None or d.axis <= len(block):
    ctx.block(d.units, f"{describe(ctx.node)}: block shape unknown, or it covers the channels")
    return
  ctx.set_dim(_out(ctx), d)


def _backprop_linear(g: view.GraphView, node: view.Node):
  w = g.constants.get(node.inputs[1])
  if w is None or w.ndim != 4:
    return None
  fmt = node.attrs.get("data_format", "NHWC")
  spatial = (2, 3) if fmt.startswith("NC") else (1, 2)
  strides = node.attrs.get("strides") or (1, 1, 1, 1)
  return desc.Linear(node.inputs[1], 2, 3, 1 if fmt.startswith("NC") else 3, int(w.shape[3]),
                     kernel=tuple(int(k) for k in w.shape[:2]),
                     strides=tuple(int(strides[a]) for a in spatial), transposed=True)


@_op("Conv2DBackpropInput", linear=_backprop_linear,
     doc="transposed convolution (Keras Conv2DTranspose): creates channels (filter axis 2); "
         "input channels cut filter axis 3; the output size's channel entry rewritten")
def conv2d_transpose(ctx: RuleContext) -> None:
  sizes_t, w, x = ctx.node.inputs[:3]
  if not base.constant(ctx, w, "filter"):
    return
  axis = _channel_axis(ctx)
  target, refs = _reshape_target(ctx, sizes_t)
  if target is None or len(target) != 4 or refs[axis] is None:
    base.block_inputs(ctx, f"{describe(ctx.node)}: output size is not constant")
    return
  if ctx.dim(x) is not None:
    ctx.slice_const(w, 3, x, base.SINK)
  ctx.new_source(_out(ctx), axis, ctx.graph.constants[w].shape[2], w, 2)
  const, position, reader = refs[axis]
  ctx.set_shape_entry(const, position, _out(ctx), reader)


@_op("Einsum", linear=desc.einsum_linear,
     doc="x times a constant 2-D weight contracting one axis (a dense layer or 1x1 "
         "convolution written as einsum): as MatMul, on whichever axes the equation names")
def einsum(ctx: RuleContext) -> None:
  base.einsum(ctx)


@_op("Shape", "ShapeN", "Size", "Rank",
     doc="shapes read at run time follow pruning by themselves")
def shape_read(ctx: RuleContext) -> None:
  # A shape read at run time follows pruning by itself. What is built from it
  # is checked where it is used: a Reshape follows only target shapes it can
  # prove (below); a tensor created from it carries no channels, so combining
  # it with channels blocks in the elementwise rule.
  del ctx


@_op("NoOp", "Placeholder", "PlaceholderWithDefault", "Const",
     doc="no channels (a placeholder's default value blocks)")
def no_channels(ctx: RuleContext) -> None:
  if ctx.node.op == "PlaceholderWithDefault":
    base.block_inputs(ctx, f"{describe(ctx.node)}: default value of an input")
