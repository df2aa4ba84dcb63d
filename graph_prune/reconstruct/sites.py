"""Which layers of a pruned model reconstruction re-fits, and where each one's
intercept goes. Read from the graph views and the op descriptions only."""

from __future__ import annotations

import dataclasses
from typing import Mapping, Optional

import numpy as np

from graph_prune.graph import view
from graph_prune.ops import affine
from graph_prune.ops import desc
from graph_prune.ops import geometry

BIAS, LSQ = "bias", "lsq"


@dataclasses.dataclass(frozen=True)
class Shift:
  """Where a layer's intercept c goes: `const` += sign * factor * c, per channel."""
  const: str
  factor: str = ""      # a per-channel scale between the layer and the shift, if any
  sign: float = 1.0     # -1 for a batch norm's mean


@dataclasses.dataclass(frozen=True)
class Site:
  """A linear layer to re-fit: the same node in the original and the pruned model."""
  node: str
  x: str                          # its input activation
  z: str                          # its output
  original: geometry.Layer
  pruned: geometry.Layer
  kept_in: Optional[np.ndarray]   # original positions of x's kept channels (None: all)
  kept_out: Optional[np.ndarray]  # ... of z's
  shift: Optional[Shift]


def _single_reader(graph: view.GraphView, const: str) -> bool:
  return len(graph.consumers(const)) == 1


def find_shift(graph: view.GraphView, ops: desc.Registry, node: view.Node,
               lin: desc.Linear, outputs: int) -> Optional[Shift]:
  """The layer's own bias, else the per-channel shift (after an optional scale)
  that alone reads its output, else the mean of a batch norm that does."""
  if lin.bias:
    ok = (lin.bias in graph.constants and graph.constants[lin.bias].size == outputs and
          _single_reader(graph, lin.bias))
    return Shift(lin.bias) if ok else None
  z = node.outputs[0]
  found = affine.after(graph, ops, z, outputs)
  if found.shift:
    if _single_reader(graph, found.shift) and (not found.scale or
                                               _single_reader(graph, found.scale)):
      return Shift(found.shift, found.scale)
    return None
  if found.scale:
    return None
  readers = graph.consumers(z)
  if len(readers) == 1 and readers[0][1] == 0:
    norm = ops.norm(graph, readers[0][0])
    if (norm is not None and norm.mean in graph.constants and
        graph.constants[norm.mean].size == outputs and _single_reader(graph, norm.mean) and
        not readers[0][0].attrs.get("is_training")):
      return Shift(norm.mean, sign=-1.0)
  return None


def find(original: view.GraphView, pruned: view.GraphView, ops: desc.Registry,
         kept: Mapping[str, np.ndarray], method: str) -> tuple[list[Site], list[str]]:
  """The sites in graph order, and why other affected layers are not sites.

  bias: every layer that reads removed channels. lsq: also every layer whose
  input differs from the original's because a layer before it was changed.
  """
  sites, skipped = [], []
  changed: set[str] = set()
  for node in pruned.nodes:
    lin = ops.linear(pruned, node)
    x = node.inputs[0] if node.inputs else ""
    reads_cut = x in kept
    if lin is None:
      if any(t in changed for t in node.inputs + node.captures):
        changed.update(node.outputs)
      continue
    if not (reads_cut or (method == LSQ and x in changed)):
      if x in changed:
        changed.update(node.outputs)
      continue
    changed.update(node.outputs)
    why = _why_not(original, pruned, ops, node, lin)
    if isinstance(why, str):
      skipped.append(f"{node.name}: {why}")
      continue
    layer_o, layer_p = why
    shift = find_shift(pruned, ops, node, lin, layer_p.outputs)
    if method == BIAS and shift is None:
      skipped.append(f"{node.name}: no bias or per-channel shift to fold the removed "
                     "channels' contribution into")
      continue
    sites.append(Site(node.name, x, node.outputs[0], layer_o, layer_p, kept.get(x),
                      kept.get(node.outputs[0]), shift))
  return sites, skipped


def every(graph: view.GraphView, ops: desc.Registry, weights
          ) -> tuple[list[Site], list[str]]:
  """A site for every linear layer of one model whose weight is in `weights` (the
  layer is its own original: nothing was removed), in graph order, and why the
  others of them cannot be re-fitted."""
  sites, skipped = [], []
  for node in graph.nodes:
    lin = ops.linear(graph, node)
    if lin is None or lin.weight not in weights:
      continue
    why = _why_not(graph, graph, ops, node, lin)
    if isinstance(why, str):
      skipped.append(f"{node.name}: {why}")
      continue
    layer = why[1]
    sites.append(Site(node.name, node.inputs[0], node.outputs[0], layer, layer, None, None,
                      find_shift(graph, ops, node, lin, layer.outputs)))
  return sites, skipped


def _why_not(original: view.GraphView, pruned: view.GraphView, ops: desc.Registry,
             node: view.Node, lin: desc.Linear):
  """(original layer, pruned layer), or why the node cannot be re-fitted."""
  if lin.weight not in pruned.constants or not _single_reader(pruned, lin.weight):
    return "its weight is not a constant of its own"
  try:
    node_o = original.node(node.name)
  except KeyError:
    return "not found in the original model"
  lin_o = ops.linear(original, node_o)
  if lin_o is None or node_o.inputs[:1] != node.inputs[:1]:
    return "it is not the same layer in the original model"
  layer_p = geometry.Layer(lin, tuple(pruned.constants[lin.weight].shape))
  layer_o = geometry.Layer(lin_o, tuple(original.constants[lin_o.weight].shape))
  for layer in (layer_o, layer_p):
    why = geometry.supported(layer)
    if why:
      return why
  if pruned.shape(node.inputs[0]) is None or original.shape(node.inputs[0]) is None:
    return "its input's rank is unknown"
  return layer_o, layer_p
