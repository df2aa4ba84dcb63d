"""The edits that remove whole layers and residual branches (--mode=layer): their
readers read the shortcut instead, and the removed nodes go."""

from __future__ import annotations

from typing import Sequence

from graph_prune.analysis import blocks as blocks_lib
from graph_prune.graph.edits import Edits


def layer_edits(graph, chosen: Sequence[blocks_lib.Block]) -> Edits:
  """Every reader of a removed block's addition (or a removed layer's last node)
  reads its shortcut instead (through chains of removed ones), and the branches,
  layers and additions go."""
  replace = {graph.node(b.end).outputs[0]: b.shortcut for b in chosen}

  def resolve(t: str) -> str:
    while t in replace:
      t = replace[t]
    return t
  drop = {name for b in chosen for name in (*b.nodes, b.end)}
  rewires = []
  for end_out in replace:
    for reader, index in graph.consumers(end_out):
      if reader.name not in drop:
        rewires.append((reader.name, index, resolve(end_out)))
  order = [n.name for n in graph.nodes if n.name in drop]
  return Edits({}, {}, tuple(rewires), drop=tuple(order))
