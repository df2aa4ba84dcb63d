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
from graph_prune.ops import channels as base
from graph_prune.ops import desc as desc_lib


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
  """Entry `position` of shape constant `const` becomes the kept count of `by`
  (of its first `upto` positions, if given)."""
  const: str
  position: int
  by: str
  consumer: str
  upto: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class AttrEntry:
  """Integer attribute `attr` of `node` (element `index` of a list attribute)
  becomes the kept channel count of `by`."""
  node: str
  attr: str
  by: str
  index: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class IndexMap:
  """Constant `const` holds one index into `by_in`'s channels per channel of
  `by_out`: entries of removed channels are dropped, the rest renumbered."""
  const: str
  by_in: str
  by_out: str
  consumer: str


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
  index_maps: tuple[IndexMap, ...]
  # Per element: its group id (-1 for channels no producer owns) and unit index.
  element_group: np.ndarray
  element_unit: np.ndarray
  # Every distinct reason a rule gave for blocking channels, in graph order (also
  # those of channels no group owns, e.g. a layer whose weights are not constant).
  reasons: tuple[str, ...] = ()
  # Per group: sets of unit indices of which at least one must be kept, with why.
  needs: Mapping[int, tuple[tuple[np.ndarray, str], ...]] = dataclasses.field(
      default_factory=dict)

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

  def _find(self, x: np.ndarray) -> np.ndarray:
    """Roots of many elements at once (a parent always has a lower id than its child)."""
    parent = self._parent
    while True:
      up = parent[x]
      if np.array_equal(up, x):
        return x
      x = up

  def union_arrays(self, a: np.ndarray, b: np.ndarray) -> None:
    """Unites a[i] with b[i] for every i, vectorised.

    Each round links the higher root of every differing pair under the lower
    one; when several pairs write the same root only one write lands, and the
    rest are redone next round. Paths are compressed at the end.
    """
    a = np.asarray(a, dtype=np.int64)
    b = np.asarray(b, dtype=np.int64)
    while True:
      ra, rb = self._find(a), self._find(b)
      differ = ra != rb
      if not differ.any():
        break
      self._parent[np.maximum(ra[differ], rb[differ])] = np.minimum(ra[differ], rb[differ])
    self._parent[a] = ra
    self._parent[b] = ra

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
    self.affine = ""
    self.uf = _UnionFind()
    self.dims: dict[str, base.ChannelDim] = {}
    self.sources: list[Source] = []
    self.slices: list[ConstSlice] = []
    self.shape_entries: list[ShapeEntry] = []
    self.attr_entries: list[AttrEntry] = []
    self.index_maps: list[IndexMap] = []
    self.needs: list[tuple[np.ndarray, str]] = []
    self.blocks: list[tuple[np.ndarray, str]] = []
    self.written: list[str] = []     # dims set by the rule running now

  def dim(self, tensor):
    return self.dims.get(tensor)

  def set_dim(self, tensor, dim):
    self.written.append(tensor)
    self.dims[tensor] = dim

  def new_source(self, tensor, axis, count, weight, weight_axis):
    elements = self.uf.add(count)
    dim = base.ChannelDim(axis, elements)
    self.set_dim(tensor, dim)
    self.sources.append(Source(self.node.name, tensor, weight, weight_axis, elements))
    self.slice_const(weight, weight_axis, tensor, base.SOURCE)
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

  def set_shape_entry(self, const, position, by, reader, upto=None):
    self.shape_entries.append(ShapeEntry(const, position, by, reader, upto))

  def check(self) -> None:
    """Checks what the rules said against the graph, once every dim is known: a
    sliced constant must exist and have one entry per channel on its axis, a
    shape entry must exist. Where not (a malformed model), the record is dropped
    and the channels it concerns are blocked."""
    kept = []
    for sl in self.slices:
      d, value = self.dims.get(sl.by), self.graph.constants.get(sl.const)
      if d is not None and value is not None and -value.ndim <= sl.axis < value.ndim and (
          value.shape[sl.axis] == len(d)):
        kept.append(sl)
      elif d is not None:
        self.block(d.units, f"{sl.consumer}: '{sl.const}' is not a constant with {len(d)} "
                   f"entries on axis {sl.axis}")
    self.slices = kept
    kept = []
    for se in self.shape_entries:
      d, value = self.dims.get(se.by), self.graph.constants.get(se.const)
      if d is not None and value is not None and 0 <= se.position < value.size:
        kept.append(se)
      elif d is not None:
        self.block(d.units, f"{se.consumer}: shape constant '{se.const}' has no entry "
                   f"{se.position}")
    self.shape_entries = kept

  def set_attr_count(self, attr, by, index=None):
    self.attr_entries.append(AttrEntry(self.node.name, attr, by, index))

  def remap_indices(self, const, by_in, by_out):
    self.index_maps.append(IndexMap(const, by_in, by_out, self.node.name))

  def need(self, units, reason):
    self.needs.append((np.asarray(units, dtype=np.int64), reason))

  def virtual(self, tag, dim):
    name = f"{self.node.name}#{tag}"
    self.set_dim(name, dim)
    return name

  def mark(self) -> tuple:
    """A point to roll back to if the rule about to run fails."""
    self.written = []
    return (len(self.sources), len(self.slices), len(self.shape_entries),
            len(self.attr_entries), len(self.index_maps), len(self.needs))

  def roll_back(self, mark: tuple) -> None:
    for t in self.written:
      self.dims.pop(t, None)
    for records, n in zip((self.sources, self.slices, self.shape_entries, self.attr_entries,
                           self.index_maps, self.needs), mark):
      del records[n:]


def analyse(graph: view.GraphView, registry: desc_lib.Registry) -> Analysis:
  """Walks the graph once in topological order and freezes the channel groups."""
  w = _Walker(graph)
  for node in graph.nodes:
    w.node = node
    desc = registry.of(graph, node)
    w.affine = desc.affine if desc is not None else ""
    if desc is None:
      version = f" (opset {graph.opset})" if graph.opset else ""
      base.block_inputs(w, f"{base.describe(node)}: no channel rule for op type "
                        f"{node.op}{version}")
    else:
      mark = w.mark()
      try:
        desc.channels(w)
      except (ValueError, TypeError, IndexError, KeyError, ZeroDivisionError) as e:
        # A node the rule cannot read (a malformed model): what the rule recorded
        # is undone and the node's channels stay whole, with the reason.
        w.roll_back(mark)
        base.block_inputs(w, f"{base.describe(node)}: cannot follow channels through it "
                          f"({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})")
    # A subgraph's reads of outer-scope tensors are not followed into the body:
    # channels that reach one stay whole, so no branch is left inconsistent.
    for t in node.captures:
      d = w.dims.get(t)
      if d is not None:
        w.block(d.units, f"{base.describe(node)}: '{t}' is read inside a subgraph")
    if node.loop:
      for t in node.outputs:
        d = w.dims.get(t)
        if d is not None:
          w.block(d.units, f"{base.describe(node)}: inside the body of loop '{node.loop}'")
  for out in graph.outputs:
    d = w.dims.get(out)
    if d is not None:
      w.blocks.append((d.units, f"channels reach graph output '{out}'"))
  w.check()
  return _freeze(graph, w)


def _freeze(graph: view.GraphView, w: _Walker) -> Analysis:
  roots = w.uf.roots()
  n = len(roots)
  # Every (source, root) pair, in source order then channel order.
  sizes = [len(src.elements) for src in w.sources]
  pair_src = np.repeat(np.arange(len(w.sources)), sizes)
  pair_root = (roots[np.concatenate([src.elements for src in w.sources])]
               if w.sources else np.zeros(0, dtype=np.int64))
  # Sources whose elements share a root belong to one group: unite each source
  # with the first source that owns each of its roots.
  src_uf = _UnionFind()
  src_uf.add(len(w.sources))
  _, first = np.unique(pair_root, return_index=True)
  owner = np.full(n, -1, dtype=np.int64)
  owner[pair_root[first]] = pair_src[first]
  n_src = max(len(w.sources), 1)
  keys = np.unique(pair_src * n_src + owner[pair_root])   # distinct (source, owner) links
  links_a, links_b = keys // n_src, keys % n_src
  differ = links_a != links_b
  src_uf.union_arrays(links_a[differ], links_b[differ])
  # Groups are numbered by their first source; units by first appearance.
  _, src_gid = np.unique(src_uf.roots(), return_inverse=True)
  n_groups = int(src_gid.max()) + 1 if len(src_gid) else 0
  first_src = np.full(n_groups, len(w.sources))
  np.minimum.at(first_src, src_gid, np.arange(len(w.sources)))
  renumber = np.empty(n_groups, dtype=np.int64)
  renumber[np.argsort(first_src)] = np.arange(n_groups)
  src_gid = renumber[src_gid]
  group_sources: list[list[str]] = [[] for _ in range(n_groups)]
  for i, src in enumerate(w.sources):
    group_sources[src_gid[i]].append(src.node)
  appear = pair_root[np.sort(first)]            # distinct roots in order of first appearance
  appear_gid = src_gid[owner[appear]]
  per_group = np.bincount(appear_gid, minlength=n_groups)
  by_group = np.argsort(appear_gid, kind="stable")
  root_group = np.full(n, -1, dtype=np.int64)
  root_unit = np.full(n, -1, dtype=np.int64)
  root_group[appear] = appear_gid
  root_unit[appear[by_group]] = np.arange(len(appear)) - np.repeat(
      np.cumsum(per_group) - per_group, per_group)
  counts = per_group.tolist()
  element_group = root_group[roots]
  element_unit = root_unit[roots]

  # Many blocks and slices refer to the same channel array: look each up once.
  group_sets: dict[int, list[int]] = {}

  def groups_of(units: np.ndarray) -> list[int]:
    key = id(units)
    if key not in group_sets:
      group_sets[key] = [g for g in np.unique(element_group[units]).tolist() if g >= 0]
    return group_sets[key]

  reasons: list[list[str]] = [[] for _ in counts]
  for elements, reason in w.blocks:
    for gid in groups_of(elements):
      if reason not in reasons[gid]:
        reasons[gid].append(reason)
  members: list[dict[str, None]] = [dict.fromkeys(s) for s in group_sources]
  for sl in list(w.slices) + list(w.shape_entries) + list(w.index_maps):
    d = w.dims.get(sl.by_out if isinstance(sl, IndexMap) else sl.by)
    if d is not None:
      for gid in groups_of(d.units):
        members[gid].setdefault(sl.consumer)
  groups = tuple(
      ChannelGroup(gid, tuple(dict.fromkeys(group_sources[gid])), tuple(members[gid]),
                   counts[gid], tuple(reasons[gid]))
      for gid in range(len(counts)))
  needs: dict[int, list[tuple[np.ndarray, str]]] = {}
  # Every producer keeps at least one channel: a group whose units are spread over
  # several producers (their outputs concatenated, then coupled by an add) could
  # otherwise leave one with no filters.
  producer_needs = [(src.elements, f"{src.node}: keeps at least one of its channels")
                    for src in w.sources]
  for elements, reason in producer_needs + w.needs:
    owners = element_group[elements]
    if (owners < 0).any():
      continue  # a channel no group owns is never removed: the set stays non-empty
    # Each group keeps one of its own part (safe, if more than strictly needed).
    for gid in np.unique(owners).tolist():
      needs.setdefault(gid, []).append(
          (np.unique(element_unit[elements][owners == gid]), reason))
  return Analysis(graph, groups, tuple(w.sources), dict(w.dims), tuple(w.slices),
                  tuple(w.shape_entries), tuple(w.attr_entries), tuple(w.index_maps),
                  element_group, element_unit, tuple(dict.fromkeys(r for _, r in w.blocks)),
                  {g: tuple(v) for g, v in needs.items()})
