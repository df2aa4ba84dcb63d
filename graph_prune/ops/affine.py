"""The per-channel scale and shift right after a layer's output (a folded batch
norm, a bias), found through the op descriptions. Batch-norm recalibration
re-fits them; reconstruction adds a layer's new intercept to the shift."""

from __future__ import annotations

import dataclasses
from typing import Optional

from graph_prune.graph import view
from graph_prune.ops import desc


@dataclasses.dataclass(frozen=True)
class Affine:
  """out = tensor * scale + shift, per channel; `output` is the shift's output."""
  scale: str = ""    # the per-channel Mul constant, if any
  shift: str = ""    # the per-channel Add constant, if any
  output: str = ""


def per_channel_operand(graph: view.GraphView, node: view.Node, tensor: str,
                        channels: int) -> Optional[str]:
  """The node's other input if it is a constant with one value per channel."""
  others = [t for t in node.inputs if t != tensor]
  if len(node.inputs) != 2 or len(others) != 1 or others[0] not in graph.constants:
    return None
  value = graph.constants[others[0]]
  return others[0] if value.size == channels and max(value.shape, default=1) == channels else None


def after(graph: view.GraphView, ops: desc.Registry, tensor: str, channels: int) -> Affine:
  """The per-channel scale (optional) and shift that are the only readers of
  `tensor`, one after the other; empty fields where there is none."""
  cur, scale = tensor, ""
  readers = graph.consumers(cur)
  if len(readers) == 1 and ops.affine(graph, readers[0][0]) == "scale":
    scale = per_channel_operand(graph, readers[0][0], cur, channels) or ""
    if scale:
      cur = readers[0][0].outputs[0]
      readers = graph.consumers(cur)
  if len(readers) == 1 and ops.affine(graph, readers[0][0]) == "shift":
    shift = per_channel_operand(graph, readers[0][0], cur, channels)
    if shift:
      return Affine(scale, shift, readers[0][0].outputs[0])
  return Affine(scale, "", cur)
