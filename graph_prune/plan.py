"""The pruning plan: which units each group keeps. Frozen, JSON, re-appliable.

Groups are matched on re-application by their source node names, so a plan
written for one file applies to the same model read again (or re-exported).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Mapping

import numpy as np

from graph_prune import errors
from graph_prune.analysis import groups as groups_lib

PLAN_VERSION = 1


@dataclasses.dataclass(frozen=True)
class GroupPlan:
  group: int
  sources: tuple[str, ...]
  channels: int
  keep: tuple[int, ...]
  criterion: str

  @property
  def removed(self) -> tuple[int, ...]:
    mask = np.ones(self.channels, dtype=bool)
    mask[list(self.keep)] = False
    return tuple(np.flatnonzero(mask).tolist())


@dataclasses.dataclass(frozen=True)
class Plan:
  groups: tuple[GroupPlan, ...]
  criterion: str = ""
  ratio: float = 0.0
  round_to: int = 1

  def removed_units(self) -> Mapping[int, np.ndarray]:
    return {g.group: np.asarray(g.removed, dtype=np.int64) for g in self.groups}

  def to_json(self) -> str:
    doc = {"version": PLAN_VERSION, "criterion": self.criterion, "ratio": self.ratio,
           "round_to": self.round_to,
           "groups": [{"group": g.group, "sources": list(g.sources), "channels": g.channels,
                       "keep": list(g.keep), "criterion": g.criterion} for g in self.groups]}
    return json.dumps(doc, indent=1, sort_keys=True) + "\n"

  @classmethod
  def from_json(cls, text: str) -> "Plan":
    try:
      doc = json.loads(text)
      if doc.get("version") != PLAN_VERSION:
        raise ValueError(f"version {doc.get('version')!r}")
      groups = tuple(GroupPlan(int(g["group"]), tuple(g["sources"]), int(g["channels"]),
                               tuple(int(k) for k in g["keep"]), str(g["criterion"]))
                     for g in doc["groups"])
      return cls(groups, str(doc.get("criterion", "")), float(doc.get("ratio", 0.0)),
                 int(doc.get("round_to", 1)))
    except (ValueError, KeyError, TypeError) as e:
      raise errors.InputError(f"plan file is not a graph_prune plan ({e}); write one with "
                              "--plan_out") from None


def empty(analysis: groups_lib.Analysis) -> Plan:
  """A plan that keeps everything (for round trips)."""
  return Plan(tuple(GroupPlan(g.id, g.sources, g.channels, tuple(range(g.channels)), "none")
                    for g in analysis.groups if g.prunable))


def rebind(plan: Plan, analysis: groups_lib.Analysis) -> Plan:
  """Maps a plan read from JSON onto this analysis's groups, checking it fits."""
  by_sources = {g.sources: g for g in analysis.groups}
  out = []
  for gp in plan.groups:
    g = by_sources.get(gp.sources)
    if g is None:
      raise errors.UsageError(f"plan group with sources {list(gp.sources)[:3]} is not in this "
                              "model; was the plan written for another model?")
    if not g.prunable:
      raise errors.UsageError(f"plan prunes group {list(gp.sources)[:3]}, which is blocked here: "
                              f"{g.blocked[0]}")
    if g.channels != gp.channels or not gp.keep or max(gp.keep) >= g.channels:
      raise errors.UsageError(f"plan group {list(gp.sources)[:3]} has {gp.channels} channels "
                              f"but the model has {g.channels}")
    for units, why in analysis.needs.get(g.id, ()):
      if not set(gp.keep).intersection(units.tolist()):
        raise errors.UsageError(f"plan for group {list(gp.sources)[:3]} keeps no channel of a "
                                f"set that needs one ({why})")
    out.append(dataclasses.replace(gp, group=g.id))
  return dataclasses.replace(plan, groups=tuple(out))
