"""Channel groups: which channels of which tensors must be removed together.

Every producer of new channels (a convolution's filters, a dense layer's
units) allocates one element per channel. Rules say how elements flow through
each op; ops that combine computed tensors elementwise (residual adds,
squeeze-excite products) unite elements with union-find. A *unit* is a set of
united elements, removed or kept as one; a *group* is the set of producers
whose units are tied together. A unit that reaches a graph output or an op
without a rule is blocked, and so is its group, with the reason.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Optional

import numpy as np

from graph_prune.graph import view
from graph_prune.rules import base


@dataclasses.dataclass(frozen=True)
class Source:
  """A node that creates channels: its output tensor and the weight that makes them."""
  node: str
  tensor: str
  weight: str
  weight_axis: int
  elements: np.ndarray


@dataclasses.dataclass(frozen=True)
class ConstSlice:
  """`const` is cut along `axis` by the keep-mask of tensor `by`'s channels."""
  const: str
  axis: int
  by: str
  role: str
  consumer: str


@dataclasses.dataclass(frozen=True)
class ShapeEntry:
  """Entry `position` of shape constant `const` becomes the kept count of `by`."""
  const: str
  position: int
  by: str
  consumer: str


@dataclasses.dataclass(frozen=True)
class AttrEntry:
  """Integer attribute `attr` of `node` becomes the kept channel count of `by`."""
  node: str
  attr: str
  by: str


@dataclasses.dataclass(frozen=True)
class ChannelGroup:
  id: int
  sources: tuple[str, ...]      # nodes that create the group's channels
  members: tuple[str, ...]      # every node with a constant sliced by the group
  channels: int                 # number of units (channels of each source)
  blocked: tuple[str, ...]      # reasons the group is left whole; empty if prunable

  @property
  def prunable(self) -> bool:
    return not self.blocked


@dataclasses.dataclass(frozen=True)
class Analysis:
  graph: view.GraphView
  groups: tuple[ChannelGroup, ...]
  sources: tuple[Source, ...]
  dims: Mapping[str, base.ChannelDim]
  slices: tuple[ConstSlice, ...]
  shape_entries: tuple[ShapeEntry, ...]
  attr_entries: tuple[AttrEntry, ...]
  # Per element: its group id (-1 for channels no producer owns) and unit index.
  element_group: np.ndarray
  element_unit: np.ndarray

  def removed_elements(self, removed: Mapping[int, np.ndarray]) -> np.ndarray:
    """Boolean mask over all elements, given the removed unit indices of each group."""
    offsets = np.zeros(len(self.groups) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([g.channels for g in self.groups])
    gone = np.zeros(offsets[-1], dtype=bool)
    for gid, units in removed.items():
      gone[offsets[gid] + np.asarray(units, dtype=np.int64)] = True
    owned = self.element_group >= 0
    mask = np.zeros(len(self.element_group), dtype=bool)
    mask[owned] = gone[offsets[self.element_group[owned]] + self.element_unit[owned]]
    return mask


class _UnionFind:
  def __init__(self):
    self._parent = np.zeros(1024, dtype=np.int64)
    self.size = 0

  @property
  def parent(self) -> np.ndarray:
    return self._parent[:self.size]

  def add(self, count: int) -> np.ndarray:
    start = self.size
    if start + count > len(self._parent):  # grow geometrically: adds stay linear overall
      grown = np.zeros(max(2 * len(self._parent), start + count), dtype=np.int64)
      grown[:start] = self._parent[:start]
      self._parent = grown
    ids = np.arange(start, start + count, dtype=np.int64)
    self._parent[start:start + count] = ids
    self.size += count
    return ids

  def find(self, x: int) -> int:
    parent = self.parent
    root = x
    while parent[root] != root:
      root = parent[root]
    while parent[x] != root:
      parent[x], x = root, parent[x]
    return root

  def union_arrays(self, a: np.ndarray, b: np.ndarray) -> None:
    for x, y in zip(a.tolist(), b.tolist()):
      rx, ry = self.find(x), self.find(y)
      if rx != ry:
        self.parent[max(rx, ry)] = min(rx, ry)

  def roots(self) -> np.ndarray:
    parent = self.parent.copy()
    while True:
      nxt = parent[parent]
      if np.array_equal(nxt, parent):
        return parent
      parent = nxt


class _Walker:
  """The RuleContext the rules write into while the graph is walked once."""

  def __init__(self, graph: view.GraphView):
    self.graph = graph
    self.node: Optional[view.Node] = None
    self.uf = _UnionFind()
    self.dims: dict[str, base.ChannelDim] = {}
    self.sources: list[Source] = []
    self.slices: list[ConstSlice] = []
    self.shape_entries: list[ShapeEntry] = []
    self.attr_entries: list[AttrEntry] = []
    self.blocks: list[tuple[np.ndarray, str]] = []

  def dim(self, tensor):
    return self.dims.get(tensor)

  def set_dim(self, tensor, dim):
    self.dims[tensor] = dim

  def new_source(self, tensor, axis, count, weight, weight_axis):
    elements = self.uf.add(count)
    self.sources.append(Source(self.node.name, tensor, weight, weight_axis, elements))
    self.slice_const(weight, weight_axis, tensor, base.SOURCE)
    dim = base.ChannelDim(axis, elements)
    self.dims[tensor] = dim
    return dim

  def new_fixed(self, count, reason):
    elements = self.uf.add(count)
    self.blocks.append((elements, reason))
    return elements

  def couple(self, a, b):
    if not np.array_equal(a, b):
      self.uf.union_arrays(a, b)

  def block(self, units, reason):
    self.blocks.append((np.asarray(units, dtype=np.int64), reason))

  def slice_const(self, const, axis, by, role):
    self.slices.append(ConstSlice(const, axis, by, role, self.node.name))

  def set_shape_entry(self, const, position, by, reader):
    self.shape_entries.append(ShapeEntry(const, position, by, reader))

  def set_attr_count(self, attr, by):
    self.attr_entries.append(AttrEntry(self.node.name, attr, by))


def analyse(graph: view.GraphView, rules: Mapping[str, base.Rule]) -> Analysis:
  """Walks the graph once in topological order and freezes the channel groups."""
  w = _Walker(graph)
  for node in graph.nodes:
    w.node = node
    rule = rules.get(node.op)
    if rule is None:
      base.block_inputs(w, f"{base.describe(node)}: no channel rule for op type {node.op}")
    else:
      rule(w)
  for out in graph.outputs:
    d = w.dims.get(out)
    if d is not None:
      w.blocks.append((d.units, f"channels reach graph output '{out}'"))
  return _freeze(graph, w)


def _freeze(graph: view.GraphView, w: _Walker) -> Analysis:
  roots = w.uf.roots()
  n = len(roots)
  # Sources whose elements share a root belong to one group.
  src_uf = _UnionFind()
  src_uf.add(len(w.sources))
  owner: dict[int, int] = {}
  for i, src in enumerate(w.sources):
    for r in np.unique(roots[src.elements]).tolist():
      j = owner.setdefault(r, i)
      if j != i:
        src_uf.union_arrays(np.array([i]), np.array([j]))
  src_group = src_uf.roots()
  group_ids: dict[int, int] = {}
  root_group = np.full(n, -1, dtype=np.int64)
  root_unit = np.full(n, -1, dtype=np.int64)
  counts: list[int] = []
  group_sources: list[list[str]] = []
  for i, src in enumerate(w.sources):
    gid = group_ids.setdefault(int(src_group[i]), len(group_ids))
    if gid == len(counts):
      counts.append(0)
      group_sources.append([])
    group_sources[gid].append(src.node)
    for r in roots[src.elements].tolist():
      if root_unit[r] < 0:
        root_group[r], root_unit[r] = gid, counts[gid]
        counts[gid] += 1
  element_group = root_group[roots]
  element_unit = root_unit[roots]

  reasons: list[list[str]] = [[] for _ in counts]
  for elements, reason in w.blocks:
    for gid in np.unique(element_group[elements]).tolist():
      if gid >= 0 and reason not in reasons[gid]:
        reasons[gid].append(reason)
  members: list[list[str]] = [list(s) for s in group_sources]
  for sl in list(w.slices) + list(w.shape_entries):
    d = w.dims.get(sl.by)
    if d is None:
      continue
    for gid in np.unique(element_group[d.units]).tolist():
      if gid >= 0 and sl.consumer not in members[gid]:
        members[gid].append(sl.consumer)
  groups = tuple(
      ChannelGroup(gid, tuple(dict.fromkeys(group_sources[gid])), tuple(members[gid]),
                   counts[gid], tuple(reasons[gid]))
      for gid in range(len(counts)))
  return Analysis(graph, groups, tuple(w.sources), dict(w.dims), tuple(w.slices),
                  tuple(w.shape_entries), tuple(w.attr_entries), element_group, element_unit)
