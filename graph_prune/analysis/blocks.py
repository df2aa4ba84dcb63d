"""Residual blocks that can be removed whole (--mode=layer), framework-neutral.

A removable block is an addition `x + branch(x)` where:
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
the addition. Each addition with two computed operands that is not removable is
reported with the reason.

A block's score is the gain of its branch's last layer: the mean over its output
channels of the mean |weight| of the channel's filter times the |scale| of the
per-channel scales after it (a folded batch norm's gamma / sigma). Every
candidate is scored the same way, so the ranking needs no normalisation across
layers of different widths; the branch that adds least to its shortcut goes first.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from graph_prune.graph import view
from graph_prune.ops import desc

ADDS = frozenset({"Add", "AddV2"})


@dataclasses.dataclass(frozen=True)
class Block:
  add: str                       # the addition's node
  shortcut: str                  # x
  branch: str                    # the branch's output tensor
  nodes: tuple[str, ...]         # the branch's nodes, in graph order (the addition not among them)
  linears: int                   # linear layers in the branch
  zero: tuple[str, ...]          # constants zeroed in the masked original
  score: float
  flops_share: float = 0.0       # filled by the caller where it knows the FLOPs


@dataclasses.dataclass(frozen=True)
class Found:
  blocks: tuple[Block, ...]
  skipped: tuple[tuple[str, str], ...]   # (addition node, reason)


def find(graph: view.GraphView, ops: desc.Registry) -> Found:
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
  return Found(tuple(blocks), tuple(skipped))


def _block(graph: view.GraphView, ops: desc.Registry, add: view.Node, x: str,
           y: str) -> tuple[Optional[Block], str]:
  if any(o in graph.outputs for o in add.outputs):
    return None, "its output is a graph output"
  if add.loop or add.captures:
    return None, "it runs in a loop or a subgraph"
  sx, sy = graph.shape(x), graph.shape(y)
  if sx is None or sy is None or len(sx) != len(sy) or any(
      p is None or q is None or p != q for p, q in zip(sx[1:], sy[1:])):
    return None, f"operands of shapes {sx} and {sy}: not a same-shape residual"
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
  return Block(add.name, x, y, order, len(linears), zero, score), ""


def _tail(graph: view.GraphView, ops: desc.Registry, y: str, inside: set[str]):
  """(constants whose zeroing makes y exactly 0, the branch's gain) or a reason."""
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
      zero.extend([norm.scale, norm.shift])
      scales.append(np.abs(np.asarray(graph.constants[norm.scale], np.float64)).reshape(-1))
      t = node.inputs[0]
      # A batch norm zeroed at its scale and shift is 0 whatever reads into it.
      inner = _tail(graph, ops, t, inside)
      if isinstance(inner, str):
        return inner
      return tuple(zero), inner[1] * float(np.mean(scales[-1]))
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


def _gain(weight: np.ndarray, lin: desc.Linear, scales: list[np.ndarray]) -> float:
  w = np.abs(np.asarray(weight, np.float64))
  per_out = np.moveaxis(w, lin.out_axis, 0).reshape(w.shape[lin.out_axis], -1).mean(axis=1)
  for s in scales:
    if s.size == per_out.size:
      per_out = per_out * s
    elif s.size == 1:
      per_out = per_out * float(s[0])
  return float(per_out.mean())


def choose(found: Found, ratio: float) -> tuple[Block, ...]:
  """The round(ratio x removable) blocks of least score."""
  count = int(round(ratio * len(found.blocks)))
  return tuple(sorted(found.blocks, key=lambda b: (b.score, b.add))[:count])
