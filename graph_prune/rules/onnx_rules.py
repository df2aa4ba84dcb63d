"""Channel rules for ONNX op types (opsets 9 to 21), one small function per op kind.

Layout is NCHW with OIHW weights (Conv), [C_in, C_out/group, kH, kW]
(ConvTranspose), [K, N] (MatMul) and [K, N] or [N, K] (Gemm with transB).
Attributes that moved to inputs across opsets (axes, pads, min/max) are read
from whichever the node has. An op without a rule blocks its channels.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from graph_prune.rules import base
from graph_prune.rules.base import ChannelDim, RuleContext, describe

RULES, _rule = base.registry()
_out = base.output


def _input(ctx: RuleContext, i: int) -> Optional[str]:
  inputs = ctx.node.inputs
  return inputs[i] if len(inputs) > i and inputs[i] else None


def _ints(ctx: RuleContext, attr: str, input_index: int) -> Optional[list[int]]:
  """An int list given as attribute (older opsets) or constant input (newer)."""
  t = _input(ctx, input_index)
  if t is not None:
    return base.const_ints(ctx, t)
  value = ctx.node.attrs.get(attr)
  return None if value is None else list(value)


def _bias(ctx: RuleContext, index: int) -> None:
  b = _input(ctx, index)
  if b is not None:
    ctx.slice_const(b, 0, _out(ctx), base.PARAM)


@_rule("Conv")
def conv(ctx: RuleContext) -> None:
  x, w = ctx.node.inputs[:2]
  if not ctx.graph.is_const(w):
    base.block_inputs(ctx, f"{describe(ctx.node)}: weights are not a constant")
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
  reason = (f"{describe(ctx.node)}: grouped convolution ({group} groups) needs channels "
            "removed evenly per group; left whole")
  if d is not None:
    ctx.block(d.units, reason)


@_rule("ConvTranspose")
def conv_transpose(ctx: RuleContext) -> None:
  x, w = ctx.node.inputs[:2]
  if not ctx.graph.is_const(w) or ctx.node.attrs.get("group", 1) != 1:
    base.block_inputs(ctx, f"{describe(ctx.node)}: only ungrouped, constant-weight "
                      "transposed convolutions")
    return
  if ctx.node.attrs.get("output_shape") is not None and len(ctx.node.attrs["output_shape"]) > 2:
    base.block_inputs(ctx, f"{describe(ctx.node)}: output_shape names the channels")
    return
  if ctx.dim(x) is not None:
    ctx.slice_const(w, 0, x, base.SINK)
  ctx.new_source(_out(ctx), 1, ctx.graph.constants[w].shape[1], w, 1)
  _bias(ctx, 2)


@_rule("BatchNormalization")
def batch_norm(ctx: RuleContext) -> None:
  d = ctx.dim(ctx.node.inputs[0])
  if d is None:
    return
  params = ctx.node.inputs[1:5]
  if d.axis != 1 or ctx.node.attrs.get("training_mode", 0):
    ctx.block(d.units, f"{describe(ctx.node)}: channels not on axis 1, or training mode")
    return
  if not all(ctx.graph.is_const(p) and ctx.graph.shape(p) == (len(d),) for p in params):
    ctx.block(d.units, f"{describe(ctx.node)}: parameters are not per-channel constants")
    return
  for role, p in zip((base.SCALE, base.PARAM, base.PARAM, base.PARAM), params):
    ctx.slice_const(p, 0, _out(ctx), role)
  ctx.set_dim(_out(ctx), d)


def _dense(ctx: RuleContext, a: str, w: str, in_axis: int, out_axis: int) -> None:
  d = ctx.dim(a)
  if d is not None:
    if d.axis != (ctx.graph.rank(a) or 0) - 1:
      ctx.block(d.units, f"{describe(ctx.node)}: channels are not the contracted axis")
      return
    ctx.slice_const(w, in_axis, a, base.SINK)
  out_rank = ctx.graph.rank(_out(ctx)) or 2
  ctx.new_source(_out(ctx), out_rank - 1, ctx.graph.constants[w].shape[out_axis], w, out_axis)


@_rule("Gemm")
def gemm(ctx: RuleContext) -> None:
  a, b = ctx.node.inputs[:2]
  attrs = ctx.node.attrs
  if attrs.get("transA", 0) or not ctx.graph.is_const(b):
    base.block_inputs(ctx, f"{describe(ctx.node)}: only A x constant B (transA=0)")
    return
  in_axis, out_axis = (1, 0) if attrs.get("transB", 0) else (0, 1)
  n = ctx.graph.constants[b].shape[out_axis]
  c = _input(ctx, 2)
  if c is not None:
    shape = ctx.graph.shape(c)
    if not ctx.graph.is_const(c) or shape is None or (len(shape) == 2 and shape[0] != 1):
      base.block_inputs(ctx, f"{describe(ctx.node)}: C is not a constant row")
      return
  _dense(ctx, a, b, in_axis, out_axis)
  if c is not None and ctx.graph.shape(c) and ctx.graph.shape(c)[-1] == n and n > 1:
    ctx.slice_const(c, len(ctx.graph.shape(c)) - 1, _out(ctx), base.PARAM)


@_rule("MatMul")
def matmul(ctx: RuleContext) -> None:
  a, b = ctx.node.inputs[:2]
  if not ctx.graph.is_const(b) or ctx.graph.is_const(a) or ctx.graph.rank(b) != 2:
    base.block_inputs(ctx, f"{describe(ctx.node)}: only x @ constant 2-D weights")
    return
  _dense(ctx, a, b, 0, 1)


@_rule("Add", "Sub", "Mul", "Div", "Max", "Min", "Pow", "Sum", "Mean", "PRelu", "Clip")
def elementwise(ctx: RuleContext) -> None:
  base.elementwise(ctx, [t for t in ctx.node.inputs if t], _out(ctx))


_UNARY = ("Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu", "Selu",
          "Celu", "Softplus", "Softsign", "Exp", "Log", "Erf", "Neg", "Abs", "Sqrt",
          "Reciprocal", "Identity", "Dropout", "Cast", "Floor", "Ceil", "Round", "Sign",
          "Gelu", "Mish", "ThresholdedRelu", "Not")


@_rule(*_UNARY)
def unary(ctx: RuleContext) -> None:
  base.pass_through(ctx, ctx.node.inputs[0], _out(ctx))


@_rule("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool",
       "GlobalLpPool")
def pool(ctx: RuleContext) -> None:
  d = ctx.dim(ctx.node.inputs[0])
  if d is not None and d.axis != 1:
    ctx.block(d.units, f"{describe(ctx.node)}: channels not on axis 1")
    return
  base.pass_through(ctx, ctx.node.inputs[0], _out(ctx))


@_rule("ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceProd", "ReduceL1",
       "ReduceL2", "ReduceLogSumExp", "ReduceSumSquare")
def reduce(ctx: RuleContext) -> None:
  base.reduce(ctx, ctx.node.inputs[0], _ints(ctx, "axes", 1),
              bool(ctx.node.attrs.get("keepdims", 1)))


@_rule("Pad")
def pad(ctx: RuleContext) -> None:
  x = ctx.node.inputs[0]
  d = ctx.dim(x)
  if d is None:
    return
  pads = _ints(ctx, "pads", 1)
  rank = ctx.graph.rank(x)
  axes = _ints(ctx, "axes", 3) if _input(ctx, 3) else None
  if pads is None or rank is None:
    ctx.block(d.units, f"{describe(ctx.node)}: pads are not constant")
    return
  axes = [base.normalise_axis(a, rank) for a in axes] if axes else list(range(rank))
  n = len(axes)
  for k, a in enumerate(axes):
    if a == d.axis and (pads[k] or pads[k + n]):
      ctx.block(d.units, f"{describe(ctx.node)}: pads the channel axis")
      return
  ctx.set_dim(_out(ctx), d)


@_rule("Concat")
def concat(ctx: RuleContext) -> None:
  base.concat(ctx, [t for t in ctx.node.inputs if t], ctx.node.attrs.get("axis", 1))


@_rule("Flatten")
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


def _reshape_target(ctx: RuleContext, shape_t: str, x: str):
  """Target entries and, per entry, the (constant, position, reader) that holds it
  (None where the entry is the run-time batch size, written -1)."""
  target = base.const_ints(ctx, shape_t)
  if target is not None:
    return target, [(shape_t, j, ctx.node.name) for j in range(len(target))]
  concat = _skip(ctx, shape_t)
  if concat is None or concat.op != "Concat" or concat.attrs.get("axis") not in (0, -1):
    return None, None
  target, refs = [], []
  for piece in concat.inputs:
    values = base.const_ints(ctx, piece)
    if values is not None:
      target.extend(values)
      refs.extend((piece, k, concat.name) for k in range(len(values)))
    elif not target and _batch_of(ctx, piece, x):
      target.append(-1)
      refs.append(None)
    else:
      return None, None
  return target, refs


@_rule("Reshape")
def reshape(ctx: RuleContext) -> None:
  x, shape_t = ctx.node.inputs[:2]
  d = ctx.dim(x)
  if d is None:
    return
  target, target_refs = _reshape_target(ctx, shape_t, x)
  in_shape = ctx.graph.shape(x)
  if target is None or in_shape is None:
    ctx.block(d.units, f"{describe(ctx.node)}: target shape is not a constant")
    return
  refs = []
  resolved = []
  for j, t in enumerate(target):
    if t == 0 and not ctx.node.attrs.get("allowzero", 0):
      # 0 copies the input's size at run time: it follows pruning by itself.
      resolved.append(1 if in_shape[j] is None and j == 0 else in_shape[j])
      refs.append(None)
    else:
      resolved.append(t)
      refs.append(target_refs[j])
  if any(v is None for v in resolved):
    ctx.block(d.units, f"{describe(ctx.node)}: shapes not static")
    return
  base.follow_reshape(ctx, d, in_shape, resolved, refs, _out(ctx))


@_rule("Squeeze")
def squeeze(ctx: RuleContext) -> None:
  base.squeeze(ctx, ctx.node.inputs[0], _ints(ctx, "axes", 1) or [])


@_rule("Unsqueeze")
def unsqueeze(ctx: RuleContext) -> None:
  x = ctx.node.inputs[0]
  d = ctx.dim(x)
  if d is None:
    return
  axes = _ints(ctx, "axes", 1)
  rank = ctx.graph.rank(x)
  if axes is None or rank is None:
    ctx.block(d.units, f"{describe(ctx.node)}: axes or rank unknown")
    return
  out_rank = rank + len(axes)
  axes = sorted(base.normalise_axis(a, out_rank) for a in axes)
  pos = d.axis
  for a in axes:  # inserted axes push the channel axis right
    if a <= pos:
      pos += 1
  ctx.set_dim(_out(ctx), ChannelDim(pos, d.units))


@_rule("Transpose")
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


@_rule("Softmax", "LogSoftmax", "Hardmax")
def softmax(ctx: RuleContext) -> None:
  x = ctx.node.inputs[0]
  d = ctx.dim(x)
  if d is None:
    return
  rank = ctx.graph.rank(x) or 0
  axis = base.normalise_axis(ctx.node.attrs.get("axis", -1), rank)
  # Before opset 13 the input is coerced to 2-D at `axis`: everything from there is one row.
  if d.axis >= axis:
    ctx.block(d.units, f"{describe(ctx.node)}: normalises across channels")
    return
  ctx.set_dim(_out(ctx), d)


@_rule("Resize", "Upsample")
def resize(ctx: RuleContext) -> None:
  x = ctx.node.inputs[0]
  d = ctx.dim(x)
  if d is None:
    return
  scales_t = _input(ctx, 2) if ctx.node.op == "Resize" else _input(ctx, 1)
  sizes_t = _input(ctx, 3) if ctx.node.op == "Resize" else None
  if sizes_t is not None:
    sizes = base.const_ints(ctx, sizes_t)
    if sizes is None or ctx.node.attrs.get("axes"):
      ctx.block(d.units, f"{describe(ctx.node)}: sizes not constant")
      return
    ctx.set_dim(_out(ctx), d)
    ctx.set_shape_entry(sizes_t, d.axis, _out(ctx), ctx.node.name)
    return
  scales = (ctx.graph.constants[scales_t].reshape(-1) if scales_t and
            ctx.graph.is_const(scales_t) else ctx.node.attrs.get("scales"))
  if scales is None or len(scales) <= d.axis or scales[d.axis] != 1:
    ctx.block(d.units, f"{describe(ctx.node)}: scales the channel axis, or scales unknown")
    return
  ctx.set_dim(_out(ctx), d)


@_rule("Slice")
def slice_(ctx: RuleContext) -> None:
  """Crops (tf2onnx's Cropping2D) that take every channel pass them through."""
  x = ctx.node.inputs[0]
  d = ctx.dim(x)
  if d is None:
    return
  rank = ctx.graph.rank(x)
  starts, ends = _ints(ctx, "starts", 1), _ints(ctx, "ends", 2)
  axes = _ints(ctx, "axes", 3) or (list(range(len(starts))) if starts else None)
  steps = _ints(ctx, "steps", 4) or [1] * len(axes or ())
  if starts is None or ends is None or axes is None or rank is None:
    ctx.block(d.units, f"{describe(ctx.node)}: slice bounds are not constant")
    return
  for a, s, e, st in zip(axes, starts, ends, steps):
    if base.normalise_axis(a, rank) == d.axis and not (s == 0 and e >= len(d) and st == 1):
      ctx.block(d.units, f"{describe(ctx.node)}: slices the channel axis")
      return
  ctx.set_dim(_out(ctx), d)


@_rule("Shape", "Size", "Constant", "ConstantOfShape")
def no_channels(ctx: RuleContext) -> None:
  # Shapes read at run time follow pruning; what is built from them is checked
  # where it meets channels (see tf_rules.shape_read).
  del ctx
