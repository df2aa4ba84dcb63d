"""Residual blocks and plain layers that can be removed whole (--mode=layer),
framework-neutral.

A removable residual block is an addition `x + branch(x)` where:
  - one operand, x, is read by the addition directly (the identity shortcut);
  - the other operand is computed from x alone: walking back from it, every
    computed tensor met is made inside the branch or is x itself, and nothing
    outside the block reads a tensor of the branch;
  - x and the branch's output have the same static shape (no broadcasting);
  - the branch ends in a linear layer followed only by per-channel scales and
    shifts (a folded batch norm, a bias) or an inference batch norm, so that
    zeroing that layer's weight and bias and the shifts (or the norm's scale and
    shift) makes the branch exactly 0: the oracle's masked original;
  - the addition's output is not a graph output, and no node of the branch runs
    in a loop or reads tensors from a subgraph.
Removing it makes every reader of the addition read x, and drops the branch and
the addition.

A removable plain layer (a VGG-style chain) is a convolution or dense layer whose
output, after the per-channel scales, shifts and batch norms that follow it alone,
has the static shape of its input x, and whose weight can be the identity (stride
1, one output per input channel of its group, a kernel tap on the output's own
pixel). The layer becomes the identity: every reader of its last scale or shift
reads x. A ReLU after it goes too where x is itself the output of a ReLU (or of a
pooling of one), as ReLU leaves such an x as it is; otherwise the ReLU stays and
reads x. The oracle's masked original has the layer's weight set to the identity
kernel, its bias and shifts to 0, its scales to 1 (a batch norm to mean 0,
variance 1 - epsilon), which the pruned model must equal exactly. That it is the
identity is no accuracy claim: the model needs recovery (distillation) after.
Layers inside a removable residual block's branch are not candidates themselves.

Every addition with two computed operands that is not a removable block is
reported with the reason.

A candidate's score is what removing it changes per unit of input: for a block,
its branch's last layer's gain (per output channel, the L1 norm of its filter
times the |scale| of the per-channel scales after it, averaged over the output
channels); for a plain layer the same of the layer's effective weight (its scales
folded in) minus the identity. One measure for both, so the least important go
first across kinds and layers of different widths.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from graph_prune.graph import view
from graph_prune.ops import desc
from graph_prune.ops import geometry

ADDS = frozenset({"Add", "AddV2"})
BLOCK, LAYER = "block", "layer"
# Activations that leave their own outputs as they are (f(f(x)) == f(x)).
_IDEMPOTENT = frozenset({"Relu"})
# Ops whose output is non-negative where their (first) input is: pooling, moving
# values about, and padding with zeros or reflections (TensorFlow's Pad and
# MirrorPad; not PadV2 or ONNX Pad, whose fill value is an input).
_KEEPS_SIGN = frozenset({"MaxPool", "MaxPoolV2", "AvgPool", "AveragePool", "GlobalAveragePool",
                         "GlobalMaxPool", "Mean", "Identity", "Flatten", "Reshape", "Squeeze",
                         "Unsqueeze", "Transpose", "Pad", "MirrorPad"})


@dataclasses.dataclass(frozen=True)
class Block:
  end: str                       # the node whose readers read the shortcut instead
  shortcut: str                  # x
  nodes: tuple[str, ...]         # the nodes that go besides `end`, in graph order
  linears: int                   # linear layers among them
  score: float
  kind: str = BLOCK              # BLOCK (a residual branch) or LAYER (a plain layer)
  # The constants the oracle's masked original changes (zeroed for a block; the
  # identity for a layer) and, for a layer made by masked_constants, their values
  # (not kept by find: they would double the candidates' weights in memory).
  masked: tuple[str, ...] = ()
  identity: tuple[tuple[str, np.ndarray], ...] = dataclasses.field(default=(), compare=False)


@dataclasses.dataclass(frozen=True)
class Found:
  blocks: tuple[Block, ...]
  skipped: tuple[tuple[str, str], ...]   # (addition node, reason)

  @property
  def counts(self) -> dict[str, int]:
    return {kind: sum(b.kind == kind for b in self.blocks) for kind in (BLOCK, LAYER)}


def find(graph: view.GraphView, ops: desc.Registry) -> Found:
  """Every removable residual block, then every removable plain layer outside them."""
  blocks, skipped = [], []
  for node in graph.nodes:
    if node.op not in ADDS or len(node.inputs) != 2:
      continue
    a, b = node.inputs
    if a in graph.constants or b in graph.constants:
      continue
    reasons = []
    for x, y in ((a, b), (b, a)):
      block, why = _block(graph, ops, node, x, y)
      if block is not None:
        blocks.append(block)
        break
      reasons.append(why)
    else:
      skipped.append((node.name, reasons[0] if reasons[0] == reasons[1]
                      else f"{reasons[0]}; the other way round: {reasons[1]}"))
  taken = {name for b in blocks for name in b.nodes}
  for node in graph.nodes:
    if node.name not in taken:
      layer = _plain(graph, ops, node)
      if layer is not None:
        blocks.append(layer)
  return Found(tuple(blocks), tuple(skipped))


def _block(graph: view.GraphView, ops: desc.Registry, add: view.Node, x: str,
           y: str) -> tuple[Optional[Block], str]:
  if any(o in graph.outputs for o in add.outputs):
    return None, "its output is a graph output"
  if add.loop or add.captures:
    return None, "it runs in a loop or a subgraph"
  if not _same_shape(graph, x, y):
    return None, (f"operands of shapes {graph.shape(x)} and {graph.shape(y)}: not a "
                  "same-shape residual")
  inside: set[str] = set()
  stack = [y]
  seen = {y}
  while stack:
    t = stack.pop()
    if t == x or t in graph.constants:
      continue
    producer = graph.producer(t)
    if producer is None:
      return None, f"the branch reads '{t}', which x does not compute"
    if producer.loop or producer.captures:
      return None, "the branch runs in a loop or a subgraph"
    if producer.name in inside:
      continue
    inside.add(producer.name)
    for u in producer.inputs:
      if u not in seen:
        seen.add(u)
        stack.append(u)
  if not inside:
    return None, "the other operand is x itself"
  for name in inside:
    for t in graph.node(name).outputs:
      for reader, _ in graph.consumers(t):
        if reader.name not in inside and not (reader.name == add.name and t == y):
          return None, f"'{reader.name}' outside the branch reads its tensor '{t}'"
      if t in graph.outputs:
        return None, f"the branch's tensor '{t}' is a graph output"
  linears = [n for n in graph.nodes if n.name in inside and ops.linear(graph, n) is not None]
  if not linears:
    return None, "the branch has no linear layer"
  tail = _tail(graph, ops, y, inside)
  if isinstance(tail, str):
    return None, tail
  zero, score = tail
  order = tuple(n.name for n in graph.nodes if n.name in inside)
  return Block(add.name, x, order, len(linears), score, BLOCK, tuple(zero)), ""


def _same_shape(graph: view.GraphView, x: str, y: str) -> bool:
  sx, sy = graph.shape(x), graph.shape(y)
  return not (sx is None or sy is None or len(sx) != len(sy) or any(
      p is None or q is None or p != q for p, q in zip(sx[1:], sy[1:])))


def _tail(graph: view.GraphView, ops: desc.Registry, y: str, inside: set[str]):
  """(constants whose zeroing makes y exactly 0, the branch's gain) or a reason.
  Iterative: a branch may end in any number of scales and shifts."""
  zero: list[str] = []
  scales: list[np.ndarray] = []
  t = y
  while True:
    node = graph.producer(t)
    if node is None or node.name not in inside:
      return "the branch's end is not computed inside it"
    lin = ops.linear(graph, node)
    if lin is not None:
      if lin.weight not in graph.constants:
        return f"the branch's last layer '{node.name}' has no constant weight"
      zero.append(lin.weight)
      if lin.bias:
        zero.append(lin.bias)
      return tuple(zero), _gain(graph.constants[lin.weight], lin, scales)
    norm = ops.norm(graph, node)
    if norm is not None:
      # A batch norm zeroed at its scale and shift is 0 whatever reads into it;
      # the layer before it still gives the gain.
      zero.extend([norm.scale, norm.shift])
      scales.append(np.abs(np.asarray(graph.constants[norm.scale], np.float64)).reshape(-1))
      t = node.inputs[0]
      continue
    kind = ops.affine(graph, node)
    computed = [u for u in node.inputs if u not in graph.constants]
    consts = [u for u in node.inputs if u in graph.constants]
    if kind in ("scale", "shift") and len(computed) == 1 and len(consts) == 1:
      value = np.asarray(graph.constants[consts[0]], np.float64)
      if kind == "shift":
        zero.append(consts[0])
      else:
        scales.append(np.abs(value).reshape(-1))
      t = computed[0]
      continue
    return f"the branch ends in {node.op} '{node.name}', not a linear layer with scales and shifts"


def _per_out(weight: np.ndarray, lin: desc.Linear) -> np.ndarray:
  """|weight| summed over each output channel's filter: [outputs]."""
  w = np.abs(np.asarray(weight, np.float64))
  return np.moveaxis(w, lin.out_axis, 0).reshape(w.shape[lin.out_axis], -1).sum(axis=1)


def _gain(weight: np.ndarray, lin: desc.Linear, scales: list[np.ndarray]) -> float:
  per_out = _per_out(weight, lin)
  for s in scales:
    if s.size == per_out.size:
      per_out = per_out * s
    elif s.size == 1:
      per_out = per_out * float(s[0])
  return float(per_out.mean())


def _nonnegative(graph: view.GraphView, t: str, depth: int = 8) -> bool:
  """Whether t is the output of a ReLU, or of ops that keep the sign of one."""
  node = graph.producer(t)
  if node is None or depth == 0:
    return False
  if node.op in _IDEMPOTENT:
    return True
  return node.op in _KEEPS_SIGN and bool(node.inputs) and _nonnegative(graph, node.inputs[0],
                                                                        depth - 1)


def _plain(graph: view.GraphView, ops: desc.Registry, node: view.Node,
           values: bool = False) -> Optional[Block]:
  """The plain layer that `node` starts, or None (it is not a removable one); with
  `values`, with its identity constants."""
  lin = ops.linear(graph, node)
  if lin is None or node.loop or node.captures or lin.weight not in graph.constants:
    return None
  computed = [u for u in node.inputs if u not in graph.constants]
  shape = graph.shape(computed[0]) if len(computed) == 1 else None
  if shape is None or any(s is None for s in shape[1:]):
    return None
  x = computed[0]
  w = np.asarray(graph.constants[lin.weight])
  layer = geometry.Layer(lin, tuple(w.shape))
  size = tuple(shape[2:] if lin.channel_axis == 1 else shape[1:-1]) if lin.kernel else ()
  eye = geometry.identity(layer, size)
  if eye is None:
    return None
  masked = [(lin.weight, eye.astype(w.dtype))]
  if lin.bias:
    masked.append((lin.bias, np.zeros_like(graph.constants[lin.bias])))
  scale = np.ones(layer.outputs)
  chain = [node]
  while True:    # the scales, shifts and batch norms that follow the layer alone
    out = chain[-1].outputs[0]
    readers = graph.consumers(out)
    if len(readers) != 1 or out in graph.outputs:
      break
    nxt = readers[0][0]
    norm = ops.norm(graph, nxt)
    step = _affine_step(graph, ops, nxt, out, layer.outputs) if norm is None else None
    if norm is not None and nxt.inputs[0] == out and all(
        p in graph.constants for p in (norm.scale, norm.shift, norm.mean, norm.variance)):
      c = graph.constants
      scale = scale * np.asarray(c[norm.scale], np.float64).reshape(-1) / np.sqrt(
          np.asarray(c[norm.variance], np.float64).reshape(-1) + norm.epsilon)
      masked += [(norm.scale, np.ones_like(c[norm.scale])),
                  (norm.shift, np.zeros_like(c[norm.shift])),
                  (norm.mean, np.zeros_like(c[norm.mean])),
                  (norm.variance, np.full_like(c[norm.variance], 1.0 - norm.epsilon))]
    elif step is not None:
      const, kind, value = step
      if kind == "scale":
        scale = scale * value
        masked.append((const, np.ones_like(graph.constants[const])))
      else:
        masked.append((const, np.zeros_like(graph.constants[const])))
    else:
      break
    chain.append(nxt)
  out = chain[-1].outputs[0]
  readers = graph.consumers(out)
  if (len(readers) == 1 and out not in graph.outputs and readers[0][0].op in _IDEMPOTENT
      and _nonnegative(graph, x)):
    chain.append(readers[0][0])
  end = chain[-1]
  if end.outputs[0] in graph.outputs or not _same_shape(graph, x, end.outputs[0]):
    return None
  if len({name for name, _ in masked}) != len(masked):
    return None
  effective = geometry.matrix(w.astype(np.float64), layer) * scale.reshape(
      layer.groups, 1, -1)
  change = np.abs(effective - geometry.matrix(eye, layer)).sum(axis=1)
  return Block(end.name, x, tuple(n.name for n in chain[:-1]), 1, float(change.mean()), LAYER,
               tuple(name for name, _ in masked), tuple(masked) if values else ())


def _affine_step(graph: view.GraphView, ops: desc.Registry, node: view.Node, t: str,
                 channels: int):
  """(constant, "scale" or "shift", per-channel value) for a per-channel scale or
  shift of t by a constant, or None."""
  kind = ops.affine(graph, node)
  consts = [u for u in node.inputs if u in graph.constants]
  computed = [u for u in node.inputs if u not in graph.constants]
  if kind not in ("scale", "shift") or computed != [t] or len(consts) != 1:
    return None
  value = np.asarray(graph.constants[consts[0]], np.float64).reshape(-1)
  if value.size not in (1, channels):
    return None
  return consts[0], kind, np.broadcast_to(value, (channels,))


def masked_constants(graph: view.GraphView, ops: desc.Registry, chosen) -> dict[str, np.ndarray]:
  """The constants of the oracle's masked original: blocks' zeroed, layers' identity
  (made again here, for the chosen layers only)."""
  out = {}
  for b in chosen:
    if b.kind == BLOCK:
      out.update({c: np.zeros_like(graph.constants[c]) for c in b.masked})
    else:
      again = _plain(graph, ops, graph.node((b.nodes or (b.end,))[0]), values=True)
      assert again is not None and again.masked == b.masked, b.end
      out.update(dict(again.identity))
  return out


def order(found: Found) -> tuple[Block, ...]:
  """Every candidate, the least important first."""
  return tuple(sorted(found.blocks, key=lambda b: (b.score, b.end)))


def choose(found: Found, ratio: float) -> tuple[Block, ...]:
  """The round(ratio x removable) candidates of least score."""
  return order(found)[:int(round(ratio * len(found.blocks)))]
