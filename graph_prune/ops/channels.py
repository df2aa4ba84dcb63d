"""What a channel rule sees and says, and the helpers rules share.

A rule (the `channels` part of an op description, desc.py) describes how
channels flow through one op kind: which output axis carries which input
channels, which constants are sliced along which axis, and when pruning through
the op is impossible (then it blocks, with a reason). Channels are tracked as
arrays of element ids: position i of a tensor's channel axis carries element
`units[i]`. Rules never mutate the graph; the analysis records what they say.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional, Protocol

import numpy as np

from graph_prune.graph import view

# Roles of a sliced constant. Weights of producers ("source") and consumers
# ("sink") are what the verification oracle zeroes; "param" constants (biases,
# batch-norm parameters, per-channel scales) are only sliced.
SOURCE = "source"
SINK = "sink"
PARAM = "param"
SCALE = "scale"  # a per-channel multiplier (batch-norm gamma); sliced like PARAM.


@dataclasses.dataclass(frozen=True)
class ChannelDim:
  """The channel axis of a tensor and the element carried at each position."""
  axis: int
  units: np.ndarray  # int64, one element id per position along `axis`.

  def __len__(self) -> int:
    return len(self.units)


class RuleContext(Protocol):
  """The analysis state a rule may read and extend."""
  node: view.Node
  graph: view.GraphView
  affine: str          # the description's word on a per-channel constant operand

  def dim(self, tensor: str) -> Optional[ChannelDim]: ...
  def set_dim(self, tensor: str, dim: ChannelDim) -> None: ...
  def new_source(self, tensor: str, axis: int, count: int,
                 weight: str, weight_axis: int) -> ChannelDim: ...
  def new_fixed(self, count: int, reason: str) -> np.ndarray: ...
  def couple(self, a: np.ndarray, b: np.ndarray) -> None: ...
  def block(self, units: np.ndarray, reason: str) -> None: ...
  # Constant `const` is cut along `axis` by the keep-mask of tensor `by`'s channels.
  def slice_const(self, const: str, axis: int, by: str, role: str) -> None: ...
  def set_shape_entry(self, const: str, position: int, by: str, reader: str,
                      upto: Optional[int] = None) -> None: ...
  # Entry `position` of shape constant `const` (read by node `reader`) becomes the
  # number of kept channels of `by` (among its first `upto` positions, if given).
  # Integer attribute `attr` of the node (element `index` of a list attribute)
  # becomes the kept count of `by`.
  def set_attr_count(self, attr: str, by: str, index: Optional[int] = None) -> None: ...
  # Constant `const` holds indices into `by_in`'s channels, one per channel of
  # `by_out`: entries of removed channels go, the rest are renumbered.
  def remap_indices(self, const: str, by_in: str, by_out: str) -> None: ...
  # At least one of `units` must be kept (a slice or split output that would
  # otherwise be left with no channels).
  def need(self, units: np.ndarray, reason: str) -> None: ...
  # Names a channel dimension that is no tensor of the graph (one group's block of
  # a grouped convolution's input, say), to slice or count by; returns the name.
  def virtual(self, tag: str, dim: ChannelDim) -> str: ...


Rule = Callable[[RuleContext], None]


def block_inputs(ctx: RuleContext, reason: str) -> None:
  """Blocks every channel that reaches the node's inputs. The reason is recorded
  even when none does (a layer with non-constant weights on the model input), so
  that a model with nothing prunable says why."""
  ctx.block(np.zeros(0, dtype=np.int64), reason)
  for t in ctx.node.inputs:
    d = ctx.dim(t)
    if d is not None:
      ctx.block(d.units, reason)


def constant(ctx: RuleContext, tensor: str, what: str) -> bool:
  """Whether `tensor` (the node's `what`: "weights", "filter") is a constant; if
  not, the node's input channels are blocked with that reason."""
  if ctx.graph.is_const(tensor):
    return True
  verb = "are" if what.endswith("s") else "is"
  block_inputs(ctx, f"{describe(ctx.node)}: {what} {verb} not a constant")
  return False


def describe(node: view.Node) -> str:
  return f"{node.op} '{node.name}'"


def dim_and_rank(ctx: RuleContext, x: str, known: bool,
                 unknown: str) -> Optional[tuple[ChannelDim, int]]:
  """x's channels and rank for a rule that needs both: None where x carries no
  channels, and None after blocking them with the reason `unknown` where the
  rank is unknown or `known` (the rule's own parameters) is false."""
  d = ctx.dim(x)
  if d is None:
    return None
  rank = ctx.graph.rank(x)
  if rank is None or not known:
    ctx.block(d.units, f"{describe(ctx.node)}: {unknown}")
    return None
  return d, rank


def pass_through(ctx: RuleContext, src: str, dst: str, axis: Optional[int] = None) -> None:
  """dst carries src's channels unchanged (at `axis`, default the same axis)."""
  d = ctx.dim(src)
  if d is not None:
    ctx.set_dim(dst, ChannelDim(d.axis if axis is None else axis, d.units))


def pass_on_axis(ctx: RuleContext, src: str, dst: str, axis: int, where: str) -> None:
  """dst carries src's channels when they sit on `axis` (pooling and resizing
  work on the other axes); channels anywhere else are blocked, `where` saying
  which axis they should have been on."""
  d = ctx.dim(src)
  if d is not None and d.axis != axis:
    ctx.block(d.units, f"{describe(ctx.node)}: channels not on {where}")
    return
  pass_through(ctx, src, dst)


def elementwise(ctx: RuleContext, operands: list[str], out: str) -> None:
  """Broadcasting elementwise op over any mix of computed and constant operands.

  Computed operands that carry channels at the same (right-aligned) axis are
  coupled; per-channel constants are sliced (as SCALE where the op's description
  says its constant operand scales, else as PARAM); anything that would mix
  channels or whose shape is unknown blocks.
  """
  node, graph = ctx.node, ctx.graph
  const_role = SCALE if ctx.affine == "scale" else PARAM
  out_rank = graph.rank(out)
  if out_rank is None:
    ranks = [graph.rank(t) for t in operands]
    out_rank = None if any(r is None for r in ranks) else max(ranks)
  dims = [(t, ctx.dim(t)) for t in operands if ctx.dim(t) is not None]
  if not dims:
    return
  if out_rank is None:
    for _, d in dims:
      ctx.block(d.units, f"{describe(node)}: operand ranks unknown")
    return
  # A computed operand with one channel where the others have many broadcasts
  # over them (spatial attention: y * sigmoid(conv to 1 channel)): its channel
  # stays, and it couples nothing.
  widest = max(len(d) for _, d in dims)
  if widest > 1:
    for t, d in dims:
      if len(d) == 1:
        ctx.block(d.units, f"{describe(node)}: one channel broadcast over {widest}")
    dims = [(t, d) for t, d in dims if len(d) > 1]
  positions = {d.axis + out_rank - graph.rank(t) for t, d in dims}
  sizes = {len(d) for _, d in dims}
  if len(positions) != 1 or len(sizes) != 1:
    for _, d in dims:
      ctx.block(d.units, f"{describe(node)}: operands carry channels on different axes")
    return
  pos, size = positions.pop(), sizes.pop()
  first = dims[0][1]
  for _, d in dims[1:]:
    ctx.couple(first.units, d.units)
  for t in operands:
    if ctx.dim(t) is not None:
      continue
    shape = graph.shape(t)
    if shape is None:
      ctx.block(first.units, f"{describe(node)}: operand '{t}' has unknown shape")
      return
    a = pos - (out_rank - len(shape))
    if a < 0 or shape[a] == 1:
      continue  # broadcasts over channels: nothing to slice
    if graph.is_const(t) and shape[a] == size:
      ctx.slice_const(t, a, out, const_role)
      continue
    why = ("a constant whose size does not match the channels" if graph.is_const(t)
           else f"computed operand '{t}' with no tracked channels")
    ctx.block(first.units, f"{describe(node)}: {why}")
    return
  ctx.set_dim(out, ChannelDim(pos, first.units))


def normalise_axis(axis: int, rank: int) -> int:
  return axis + rank if axis < 0 else axis


def const_ints(ctx: RuleContext, tensor: str) -> Optional[list[int]]:
  if not ctx.graph.is_const(tensor):
    return None
  return [int(v) for v in np.asarray(ctx.graph.constants[tensor]).reshape(-1)]


def merge_span(in_shape, out_shape, axis) -> Optional[tuple[int, int, int]]:
  """Finds the output axis that holds input `axis` after a reshape.

  With T the element count after the channel axis and S the stride of output
  axis j, axis j holds whole channels when S divides T and each block of
  out[j] * S elements is a whole number of (channels x T) blocks. Position p of
  axis j then carries channel (p // inner) % C with inner = T / S.
  Returns (out_axis, outer, inner), or None when the channel axis is split.
  """
  channels = in_shape[axis]
  tail = math.prod(in_shape[axis + 1:])
  for j, size in enumerate(out_shape):
    stride = math.prod(out_shape[j + 1:])
    if stride == 0 or tail % stride or (size * stride) % (channels * tail):
      continue
    inner = tail // stride
    return j, size // (channels * inner), inner
  return None


def couple_blocks(ctx: RuleContext, units: np.ndarray, blocks: int) -> np.ndarray:
  """Couples position k of every one of `blocks` equal blocks of `units` (a grouped
  layer keeps the same positions in every group); returns the first block."""
  per = len(units) // blocks
  first = units[:per]
  for b in range(1, blocks):
    ctx.couple(first, units[b * per:(b + 1) * per])
  return first


def coarsen(ctx: RuleContext, units: np.ndarray, groups: int) -> np.ndarray:
  """Couples every run of len(units) / groups consecutive channels into one unit
  (a group that is normalised together goes as a whole); returns one
  representative per run."""
  rows = units.reshape(groups, -1)
  for i in range(1, rows.shape[1]):
    ctx.couple(rows[:, 0], rows[:, i])
  return rows[:, 0].copy()


def follow_shuffle(ctx: RuleContext, d: ChannelDim, groups: int, out: str, block_ref,
                   out_ref) -> None:
  """Channel shuffle (Reshape to (groups, C/groups), swap the two, Reshape back):
  output position k*groups + b holds input channel b*(C/groups) + k. Position k
  of every block is coupled, so each block keeps the same positions and the
  pruned shuffle is the original one restricted to the kept channels. block_ref
  and out_ref are the (constant, position, reader) of the C/groups entry of the
  first reshape and the C entry of the last, or None where they follow by
  themselves."""
  first = couple_blocks(ctx, d.units, groups)
  ctx.set_dim(out, ChannelDim(d.axis, d.units.reshape(groups, -1).T.reshape(-1)))
  if block_ref is not None:
    ctx.set_shape_entry(block_ref[0], block_ref[1],
                        ctx.virtual("shuffle_block", ChannelDim(d.axis, first)), block_ref[2])
  if out_ref is not None:
    ctx.set_shape_entry(out_ref[0], out_ref[1], out, out_ref[2])


def _coarsen_span(in_shape, out_shape, axis) -> Optional[tuple[int, int]]:
  """(out axis, groups) where a reshape folds runs of C/groups channels together
  with everything after them into one axis (decomposed GroupNorm: [N, C, H, W] ->
  [N, G, C/G*H*W]); else None."""
  channels = in_shape[axis]
  tail = math.prod(in_shape[axis + 1:])
  head = math.prod(in_shape[:axis])
  for j, size in enumerate(out_shape):
    if size <= 1 or channels % size or size == channels:
      continue
    if math.prod(out_shape[:j]) == head and math.prod(out_shape[j + 1:]) == (
        channels // size) * tail:
      return j, size
  return None


def follow_reshape(ctx: RuleContext, d: ChannelDim, in_shape, target: list[int], refs,
                   out: str) -> None:
  """Follows channels through a reshape to a resolved target shape.

  `target` may hold one -1; refs[j] is (constant, position, reading node) for
  entries that must take the new channel count, or None where the count
  follows by itself (-1, or a size copied from the input at run time).
  """
  node = ctx.node
  # The batch axis may be unknown; take it as 1 on both sides.
  in_known = [1 if (i == 0 and s is None) else s for i, s in enumerate(in_shape)]
  if any(s is None for s in in_known) or target.count(-1) > 1:
    ctx.block(d.units, f"{describe(node)}: shapes not static")
    return
  resolved = list(target)
  if -1 in resolved:
    known = math.prod(s for s in resolved if s != -1)
    resolved[resolved.index(-1)] = math.prod(in_known) // max(known, 1)
  if in_shape[0] is None and target[0] != -1 and refs[0] is not None and target[0] != 1:
    ctx.block(d.units, f"{describe(node)}: reshape mixes the batch axis")
    return
  span = merge_span(in_known, resolved, d.axis)
  if span is None:
    coarse = _coarsen_span(in_known, resolved, d.axis)
    if coarse is not None and not (coarse[0] == 0 and in_shape[0] is None):
      j, groups = coarse
      ctx.set_dim(out, ChannelDim(j, coarsen(ctx, d.units, groups)))
      if target[j] != -1 and refs[j] is not None:
        const, position, reader = refs[j]
        ctx.set_shape_entry(const, position, out, reader)
      return
  if span is None or (span[0] == 0 and in_shape[0] is None):
    ctx.block(d.units, f"{describe(node)}: splits or reorders the channel axis")
    return
  j, outer, inner = span
  ctx.set_dim(out, ChannelDim(j, np.tile(np.repeat(d.units, inner), outer)))
  if target[j] != -1 and refs[j] is not None:
    const, position, reader = refs[j]
    ctx.set_shape_entry(const, position, out, reader)


def output(ctx: RuleContext, i: int = 0) -> str:
  return ctx.node.outputs[i]


def reduce(ctx: RuleContext, x: str, axes: Optional[list[int]], keep: bool) -> None:
  """Reduction over `axes` (None: unknown); empty axes mean all axes in ONNX and are refused."""
  found = dim_and_rank(ctx, x, bool(axes), "reduction axes or rank unknown, or all axes")
  if found is None:
    return
  d, rank = found
  axes = {normalise_axis(a, rank) for a in axes}
  if d.axis in axes:
    ctx.block(d.units, f"{describe(ctx.node)}: reduces over the channel axis")
    return
  axis = d.axis if keep else d.axis - sum(1 for a in axes if a < d.axis)
  ctx.set_dim(output(ctx), ChannelDim(axis, d.units))


def concat(ctx: RuleContext, values: list[str], axis: Optional[int]) -> None:
  """Concatenation along `axis` (None: unknown). Along the channels, the operands'
  elements are laid end to end (the same tensor twice keeps two index ranges that
  share their elements); along another axis, the operands' channels line up."""
  dims = [ctx.dim(v) for v in values]
  if all(d is None for d in dims):
    return
  rank = ctx.graph.rank(values[0])
  if axis is None or rank is None:
    block_inputs(ctx, f"{describe(ctx.node)}: concat axis or rank unknown")
    return
  axis = normalise_axis(axis, rank)
  if any(d is not None and d.axis != axis for d in dims):
    elementwise(ctx, [v for v, d in zip(values, dims) if d is not None], output(ctx))
    return
  pieces = []
  for v, d in zip(values, dims):
    if d is not None:
      pieces.append(d.units)
      continue
    shape = ctx.graph.shape(v)
    if shape is None or shape[axis] is None:
      block_inputs(ctx, f"{describe(ctx.node)}: operand '{v}' has unknown channel count")
      return
    pieces.append(ctx.new_fixed(shape[axis], f"{describe(ctx.node)}: concatenated with "
                                f"'{v}', whose channels can't be pruned"))
  ctx.set_dim(output(ctx), ChannelDim(axis, np.concatenate(pieces)))


def squeeze(ctx: RuleContext, x: str, axes: list[int]) -> None:
  """Squeeze of `axes` (empty: every axis of size 1)."""
  d = ctx.dim(x)
  if d is None:
    return
  shape = ctx.graph.shape(x)
  if shape is None or (not axes and any(s is None for s in shape)):
    ctx.block(d.units, f"{describe(ctx.node)}: squeezed axes unknown")
    return
  axes = [normalise_axis(a, len(shape)) for a in axes] or [
      i for i, s in enumerate(shape) if s == 1]
  if d.axis in axes:
    ctx.block(d.units, f"{describe(ctx.node)}: squeezes the channel axis")
    return
  ctx.set_dim(output(ctx), ChannelDim(d.axis - sum(1 for a in axes if a < d.axis), d.units))


def _einsum_terms(node: view.Node, ranks) -> Optional[tuple[list[str], str]]:
  """The operand and output subscripts of a two-operand einsum, with any ellipsis
  expanded to capital letters (given each operand's rank)."""
  equation = str(node.attrs.get("equation", "")).replace(" ", "")
  if "->" not in equation:
    return None
  lhs, out = equation.split("->")
  terms = lhs.split(",")
  if len(terms) != 2 or None in ranks:
    return None
  spans = [r - (len(t) - 3) if "..." in t else 0 for t, r in zip(terms, ranks)]
  width = max(spans)
  fill = "ABCDEFGH"[:width]
  terms = [t.replace("...", fill[width - n:]) for t, n in zip(terms, spans)]
  out = out.replace("...", fill)
  if any(len(t) != r for t, r in zip(terms, ranks)):
    return None
  return terms, out


def einsum_parts(g: view.GraphView, node: view.Node):
  """For x (computed) times a constant 2-D w: (x terms, w terms, out, contracted
  letter, new letter), or None when the einsum is not a dense layer or a 1x1
  convolution."""
  if len(node.inputs) != 2:
    return None
  x, w = node.inputs
  if not g.is_const(w) or g.is_const(x):
    return None
  found = _einsum_terms(node, (g.rank(x), g.rank(w)))
  if found is None:
    return None
  (tx, tw), out = found
  if len(tw) != 2 or len(set(tx)) != len(tx):
    return None
  shared = [c for c in tw if c in tx]
  new = [c for c in tw if c not in tx]
  if len(shared) != 1 or len(new) != 1 or shared[0] in out or new[0] not in out:
    return None
  if sorted(out) != sorted(tx.replace(shared[0], "") + new[0]):
    return None
  return tx, tw, out, shared[0], new[0]


def einsum(ctx: RuleContext) -> None:
  """An einsum of x and a constant 2-D weight that contracts one of x's axes and
  adds one of the weight's (a dense layer or 1x1 convolution): as MatMul, on the
  axes the equation names."""
  parts = einsum_parts(ctx.graph, ctx.node)
  if parts is None:
    block_inputs(ctx, f"{describe(ctx.node)}: not x times a constant 2-D weight")
    return
  tx, tw, out, contracted, new = parts
  x, w = ctx.node.inputs[:2]
  d = ctx.dim(x)
  if d is not None:
    if tx[d.axis] != contracted:
      ctx.block(d.units, f"{describe(ctx.node)}: channels are not the contracted axis")
      return
    ctx.slice_const(w, tw.index(contracted), x, SINK)
  ctx.new_source(output(ctx), out.index(new), ctx.graph.constants[w].shape[tw.index(new)], w,
                 tw.index(new))


def only_reader(ctx: RuleContext, tensor: str, op: str) -> Optional[view.Node]:
  """The one node that reads `tensor` (as its first input) if it is an `op` and the
  tensor is not a graph output; else None."""
  readers = ctx.graph.consumers(tensor)
  if (len(readers) != 1 or readers[0][0].op != op or readers[0][1] != 0 or
      tensor in ctx.graph.outputs):
    return None
  return readers[0][0]


def split(ctx: RuleContext, x: str, axis: Optional[int], sizes: Optional[list[int]],
          entry: Optional[Callable[[int, str], None]]) -> None:
  """A split of x into the node's outputs along `axis`. Along the channels each
  output takes its run and keeps at least one channel; `entry(k, out)` records
  that part k's size becomes its kept count (-1 sizes follow by themselves).
  Without sizes the parts are equal, and position i of every part is coupled so
  they stay equal. Along another axis every output carries x's channels."""
  found = dim_and_rank(ctx, x, axis is not None, "split axis or rank unknown")
  if found is None:
    return
  d, rank = found
  outs = list(ctx.node.outputs)
  if normalise_axis(axis, rank) != d.axis:
    for out in outs:
      ctx.set_dim(out, d)
    return
  raw = sizes
  if sizes is None:
    if len(d) % len(outs):
      ctx.block(d.units, f"{describe(ctx.node)}: {len(d)} channels in {len(outs)} parts")
      return
    couple_blocks(ctx, d.units, len(outs))
    sizes, entry = [len(d) // len(outs)] * len(outs), None
  if sizes.count(-1) == 1:
    sizes = [len(d) - (sum(sizes) + 1) if v == -1 else v for v in sizes]
  if sum(sizes) != len(d) or len(sizes) != len(outs) or min(sizes) < 1:
    ctx.block(d.units, f"{describe(ctx.node)}: split sizes do not add up to the channels")
    return
  offsets = np.concatenate([[0], np.cumsum(sizes)])
  for k, out in enumerate(outs):
    units = d.units[offsets[k]:offsets[k + 1]]
    ctx.need(units, f"{describe(ctx.node)}: output {k} takes channels "
             f"{offsets[k]}-{offsets[k + 1] - 1}")
    ctx.set_dim(out, ChannelDim(d.axis, units))
    if entry is not None and raw[k] != -1:
      entry(k, out)


def gather(ctx: RuleContext, x: str, indices: str, axis: Optional[int]) -> None:
  """Gather of x along `axis` with constant indices. On the channel axis (1-D
  indices) the gathered channels are followed (each kept at least once) and the
  indices renumbered; on another axis the channel axis moves by the indices' rank."""
  found = dim_and_rank(ctx, x, axis is not None and ctx.graph.is_const(indices),
                       "indices or axis not constant, or rank unknown")
  if found is None:
    return
  d, rank = found
  axis = normalise_axis(axis, rank)
  index = np.asarray(ctx.graph.constants[indices])
  if axis != d.axis:
    shift = index.ndim - 1 if axis < d.axis else 0
    ctx.set_dim(output(ctx), ChannelDim(d.axis + shift, d.units))
    return
  if index.ndim != 1 or not len(index) or np.any(index >= len(d)) or np.any(index < -len(d)):
    ctx.block(d.units, f"{describe(ctx.node)}: picks channels with indices of shape "
              f"{index.shape}")
    return
  units = d.units[np.where(index < 0, index + len(d), index)]
  ctx.need(units, f"{describe(ctx.node)}: gathers channels {index.tolist()[:8]}")
  ctx.set_dim(output(ctx), ChannelDim(d.axis, units))
  ctx.remap_indices(indices, x, output(ctx))


def depth_to_space(ctx: RuleContext, axis: int, block: int, crd: bool = False) -> None:
  """Channel blocks move into space: the block^2 input channels that become one
  output channel are coupled (DCR: channel k*C' + c; CRD: c*block^2 + k)."""
  d = ctx.dim(ctx.node.inputs[0])
  if d is None:
    return
  blocks = block * block
  if d.axis != axis or len(d) % blocks:
    ctx.block(d.units, f"{describe(ctx.node)}: channels not on the op's axis, or not whole "
              "blocks")
    return
  units = coarsen(ctx, d.units, len(d) // blocks) if crd else couple_blocks(ctx, d.units, blocks)
  ctx.set_dim(output(ctx), ChannelDim(axis, units))


def space_to_depth(ctx: RuleContext, axis: int, block: int) -> None:
  """Space moves into channels: output channel k*C + c is input channel c, so each
  input channel is followed into its block^2 copies."""
  d = ctx.dim(ctx.node.inputs[0])
  if d is None:
    return
  if d.axis != axis:
    ctx.block(d.units, f"{describe(ctx.node)}: channels not on the op's axis")
    return
  ctx.set_dim(output(ctx), ChannelDim(axis, np.tile(d.units, block * block)))


def normalise_along(ctx: RuleContext, axis: Optional[int], mixes) -> None:
  """An op that normalises along `axis` (softmax): channels pass unless
  mixes(channel axis, axis) says they are normalised together."""
  found = dim_and_rank(ctx, ctx.node.inputs[0], axis is not None, "axis or rank unknown")
  if found is None:
    return
  d, rank = found
  if mixes(d.axis, normalise_axis(axis, rank)):
    ctx.block(d.units, f"{describe(ctx.node)}: normalises across channels")
    return
  ctx.set_dim(output(ctx), d)


def pad_channels(ctx: RuleContext, d: ChannelDim, before: int, after: int,
                 constant: bool) -> None:
  """Padding of the channel axis: constant padding adds fixed channels of the pad
  value around d's (nothing can remove them); reflecting or repeating padding
  copies channels that pruning may remove, and blocks."""
  if not before and not after:
    ctx.set_dim(output(ctx), d)
    return
  if not constant or before < 0 or after < 0:
    ctx.block(d.units, f"{describe(ctx.node)}: reflects, repeats or crops the channel axis")
    return
  reason = f"{describe(ctx.node)}: channels of the pad value"
  ctx.set_dim(output(ctx), ChannelDim(d.axis, np.concatenate(
      [ctx.new_fixed(before, reason), d.units, ctx.new_fixed(after, reason)])))
