"""Size and arithmetic cost of a graph view: parameters, constant bytes, FLOPs.

FLOPs count multiply-adds of the linear layers (what their op descriptions call
`linear`: convolutions, transposed convolutions, dense layers) as two
operations, for one sample (an unknown batch size is taken as 1).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from graph_prune.graph import view
from graph_prune.ops import desc


@dataclasses.dataclass(frozen=True)
class Cost:
  params: int        # elements of floating-point constants with at least one axis
  const_bytes: int   # bytes of all constants
  flops: int


def layer_flops(g: view.GraphView, ops: desc.Registry) -> list[tuple[view.Node, int]]:
  """Every linear layer with its FLOPs."""
  return [(node, desc.linear_flops(g, node, lin))
          for node in g.nodes for lin in [ops.linear(g, node)] if lin is not None]


def flops(g: view.GraphView, ops: desc.Registry) -> int:
  return sum(f for _, f in layer_flops(g, ops))


def measure(g: view.GraphView, ops: desc.Registry) -> Cost:
  params = sum(int(c.size) for c in g.constants.values()
               if c.ndim >= 1 and np.issubdtype(c.dtype, np.floating))
  const_bytes = sum(int(c.nbytes) for c in g.constants.values())
  return Cost(params, const_bytes, flops(g, ops))
