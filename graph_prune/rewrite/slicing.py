"""Turns a plan into constant edits, framework-neutral.

Two modes share one mechanism:
  slice: cut removed channels out of every constant the analysis recorded and
         fix shape constants: the pruned model;
  mask:  zero the removed channels in producer and consumer weights only: the
         oracle. The masked original computes exactly what the pruned model
         computes, because every removed channel is cut at every consumer.
A constant shared by several consumers that need different values is copied
per consumer, and that consumer is re-wired to its copy.
"""

from __future__ import annotations

import dataclasses
import tempfile
from typing import IO, Callable, Iterator, Optional

import numpy as np

from graph_prune import plan as plan_lib
from graph_prune.analysis import groups as groups_lib
from graph_prune.graph import arrays
from graph_prune.graph.edits import Edits
from graph_prune.ops import channels as base

SLICE = "slice"
MASK = "mask"


def _apply(value: np.ndarray, ops, mode: str) -> np.ndarray:
  out = value
  for axis, keep in sorted(ops.items()):
    if keep.all():
      continue
    if len(keep) != out.shape[axis]:
      raise AssertionError(f"mask of {len(keep)} does not fit axis {axis} of {out.shape}")
    if mode == SLICE:
      out = np.compress(keep, out, axis=axis)
    else:
      out = out.copy()
      index = [slice(None)] * out.ndim
      index[axis] = ~keep
      out[tuple(index)] = 0
  return out


def _keeper(analysis: groups_lib.Analysis, plan: plan_lib.Plan):
  """tensor -> the keep-mask of its channels under the plan (cached)."""
  removed = analysis.removed_elements(plan.removed_units())
  cache: dict[str, np.ndarray] = {}

  def keep(tensor: str) -> np.ndarray:
    if tensor not in cache:
      cache[tensor] = ~removed[analysis.dims[tensor].units]
    return cache[tensor]
  return keep


def _wanted(analysis: groups_lib.Analysis, keep, mode: str
            ) -> dict[str, dict[str, dict[int, np.ndarray]]]:
  """const -> consumer -> {axis: keep mask}: every cut the plan makes (mask mode:
  only the producers' and consumers' weights)."""
  wanted: dict[str, dict[str, dict[int, np.ndarray]]] = {}
  for sl in analysis.slices:
    if mode == MASK and sl.role not in (base.SOURCE, base.SINK):
      continue
    ops = wanted.setdefault(sl.const, {}).setdefault(sl.consumer, {})
    mask = keep(sl.by)
    if sl.axis in ops and not np.array_equal(ops[sl.axis], mask):
      raise AssertionError(f"{sl.consumer} cuts {sl.const} axis {sl.axis} two ways")
    ops[sl.axis] = mask
  return wanted


@dataclasses.dataclass(frozen=True)
class InPlaceMask:
  """The masked original as cuts to make in the original's own weight arrays:
  const -> {axis: keep mask}. What build_edits(MASK) gives as copies, without the
  copies (a VGG16's masked weights are as large as the model)."""
  cuts: dict[str, dict[int, np.ndarray]]

  def zero(self, constants: dict[str, np.ndarray]) -> Optional[IO[bytes]]:
    """Zeroes the cut channels of `constants` in place, after saving the arrays to a
    temporary file (on disk, not in memory) for restore(); None where that failed."""
    saved = None
    try:
      saved = tempfile.TemporaryFile(prefix="graph_prune_mask_")
      for const in self.cuts:
        saved.write(memoryview(_bytes_of(constants[const])))
    except OSError:
      if saved is not None:
        saved.close()
      saved = None
    for const, ops in self.cuts.items():
      value = constants[const]
      for axis, keep in ops.items():
        if len(keep) != value.shape[axis]:
          raise AssertionError(f"mask of {len(keep)} does not fit axis {axis} of {value.shape}")
        index = [slice(None)] * value.ndim
        index[axis] = ~keep
        value[tuple(index)] = 0
    return saved

  def restore(self, constants: dict[str, np.ndarray], saved: Optional[IO[bytes]],
              from_model: Callable[[], Iterator[tuple[str, np.ndarray]]]) -> None:
    """Gives `constants` back their values: read back into place from the file zero()
    saved, or else taken from the model (from_model yields (const, value) one at a
    time); AssertionError where a value cannot be given back."""
    restored = set()
    if saved is not None:
      with saved:
        saved.seek(0)
        for const in self.cuts:
          target = memoryview(_bytes_of(constants[const]))
          if saved.readinto(target) != len(target):
            raise AssertionError(f"the saved values of '{const}' are cut short")
          restored.add(const)
    else:
      for const, value in from_model():
        if const in self.cuts:
          np.copyto(constants[const], value)
          restored.add(const)
        del value  # before the next one is decoded
    if restored != set(self.cuts):
      raise AssertionError("the masked weights cannot all be restored: "
                           f"{sorted(set(self.cuts) - restored)[:3]}")


def _bytes_of(value: np.ndarray) -> np.ndarray:
  """The array's own memory as bytes (C-contiguous arrays only)."""
  return value.reshape(-1).view(np.uint8)


def in_place_mask(analysis: groups_lib.Analysis, plan: plan_lib.Plan) -> Optional[InPlaceMask]:
  """The masked original as an InPlaceMask where build_edits(MASK) would change
  constants only, that is, where every reader of each cut constant cuts it the same
  way and every cut constant is a floating-point array; else None."""
  wanted = _wanted(analysis, _keeper(analysis, plan), MASK)
  cuts = {}
  for const, per_consumer in wanted.items():
    value = analysis.graph.constants[const]
    if not (np.ndim(value) and np.issubdtype(value.dtype, np.floating) and
            value.flags.writeable and value.flags.c_contiguous):
      return None
    readers = {n.name for n, _ in analysis.graph.consumers(const)}
    first = next(iter(per_consumer.values()))
    if set(per_consumer) != readers or any(
        ops.keys() != first.keys() or
        any(not np.array_equal(ops[a], first[a]) for a in ops)
        for ops in per_consumer.values()):
      return None
    ops = {axis: keep for axis, keep in first.items() if not keep.all()}
    if ops:
      cuts[const] = ops
  return InPlaceMask(cuts)


def weight_masks(analysis: groups_lib.Analysis, plan: plan_lib.Plan) -> dict[str, np.ndarray]:
  """const -> boolean array of its shape, False where mask mode zeroes it: a
  full-width model whose weights are multiplied by these computes what the pruned
  model computes (grow-and-prune trains such a model). Raises ValueError for a
  constant whose readers would need different masks."""
  wanted = _wanted(analysis, _keeper(analysis, plan), MASK)
  out = {}
  for const, per_consumer in wanted.items():
    shape = analysis.graph.constants[const].shape
    masks = {consumer: _apply(np.ones(shape, bool), ops, MASK)
             for consumer, ops in per_consumer.items()}
    readers = {n.name for n, _ in analysis.graph.consumers(const)}
    first = next(iter(masks.values()))
    if readers - set(masks) and not first.all() or any(
        not np.array_equal(m, first) for m in masks.values()):
      raise ValueError(f"constant '{const}' is read by layers that keep different channels")
    out[const] = first
  return out


def build_edits(analysis: groups_lib.Analysis, plan: plan_lib.Plan, mode: str) -> Edits:
  graph = analysis.graph
  keep = _keeper(analysis, plan)
  wanted = _wanted(analysis, keep, mode)
  entries: dict[str, dict[str, list[tuple[int, int]]]] = {}
  remaps: dict[str, dict[str, tuple[str, str]]] = {}
  if mode == SLICE:
    for se in analysis.shape_entries:
      entries.setdefault(se.const, {}).setdefault(se.consumer, []).append(
          (se.position, int(keep(se.by)[:se.upto].sum())))
      wanted.setdefault(se.const, {}).setdefault(se.consumer, {})
    for im in analysis.index_maps:
      remaps.setdefault(im.const, {})[im.consumer] = (im.by_in, im.by_out)
      wanted.setdefault(im.const, {}).setdefault(im.consumer, {})

  constants, new_constants, rewires, selections = {}, {}, [], {}
  for const, per_consumer in wanted.items():
    original = graph.constants[const]
    values, cuts = {}, {}
    for consumer, ops in per_consumer.items():
      v = _apply(original, ops, mode)
      cuts[consumer] = (mode, tuple(sorted(ops.items(), key=lambda op: op[0])))
      if consumer in remaps.get(const, {}):
        v = _remap(original, *(keep(t) for t in remaps[const][consumer]))
        del cuts[consumer]
      for position, count in entries.get(const, {}).get(consumer, ()):
        if v.reshape(-1)[position] != count:
          v = v.copy()
          v.reshape(-1)[position] = count
          cuts.pop(consumer, None)
      # A new value is aligned so that a runtime can feed it without a copy.
      values[consumer] = v if v is original else arrays.aligned(v)
    readers = {n.name for n, _ in graph.consumers(const)}
    for name in readers - set(values):
      values[name] = original
    # Readers that need the same value share one constant. The original name
    # carries the value of the readers that keep it unchanged, or else of the
    # largest set of readers; every other distinct value gets one copy, named
    # after the first reader that needs it.
    classes: list[tuple[np.ndarray, list[str]]] = []
    for consumer in sorted(values):
      v = values[consumer]
      for value, names in classes:
        if v is value or (v.shape == value.shape and np.array_equal(v, value)):
          names.append(consumer)
          break
      else:
        classes.append((v, [consumer]))
    home = next((c for c in classes if c[0] is original), None)
    if home is None:
      home = max(classes, key=lambda c: len(c[1]))
      constants[const] = home[0]
      if home[1][0] in cuts:
        selections[const] = cuts[home[1][0]]
    for value, names in classes:
      if value is home[0]:
        continue
      new_name = f"{const.split(':')[0]}/gp_copy/{names[0]}"
      new_constants[new_name] = (const, value)
      if names[0] in cuts:
        selections[new_name] = cuts[names[0]]
      for consumer in names:
        node = graph.node(consumer)
        for i, t in enumerate(node.inputs):
          if t == const:
            rewires.append((consumer, i, new_name))
  attrs = []
  if mode == SLICE:
    values: dict[tuple[str, str], object] = {}
    for ae in analysis.attr_entries:
      count = int(keep(ae.by).sum())
      key = (ae.node, ae.attr)
      old = values.get(key, graph.node(ae.node).attrs.get(ae.attr))
      if ae.index is None:
        values[key] = count
      else:
        new = list(old)
        new[ae.index] = count
        values[key] = tuple(new)
    for (node, attr), value in values.items():
      if graph.node(node).attrs.get(attr) != value:
        attrs.append((node, attr, value))
  return Edits(constants, new_constants, tuple(rewires), tuple(attrs), selections)


def _remap(indices: np.ndarray, keep_in: np.ndarray, keep_out: np.ndarray) -> np.ndarray:
  """1-D indices into the input's channels, one per output channel: those of removed
  output channels dropped, the rest renumbered to the input's kept positions."""
  indices = np.asarray(indices)
  if indices.ndim != 1 or len(indices) != len(keep_out):
    raise AssertionError(f"indices of shape {indices.shape} for {len(keep_out)} channels")
  rank = np.cumsum(keep_in) - 1
  positions = np.where(indices < 0, indices + len(keep_in), indices)
  return rank[positions[keep_out]].astype(indices.dtype)
