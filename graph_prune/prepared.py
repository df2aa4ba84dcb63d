"""A model read, normalised, viewed and analysed, the input of every stage after
loading; and the rewrite of such a model by a plan (not yet validated or
verified). Below the pipeline and the budget searches, which both rewrite
candidates."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np

from graph_prune import formats
from graph_prune import heap
from graph_prune import plan as plan_lib
from graph_prune.analysis import groups as groups_lib
from graph_prune.rewrite import slicing

Format = formats.Format


@dataclasses.dataclass(frozen=True)
class Prepared:
  """A model read and normalised, with its channel analysis."""
  format: Format
  model: Any
  graph: Any
  analysis: groups_lib.Analysis


def prepare_model(fmt: Format, model: Any) -> Prepared:
  """Normalise a loaded model, view it and analyse its channel groups."""
  return viewed(fmt, fmt.adapter.normalise(model))


def bytes_on_disk(path: str) -> int:
  """A model's size on disk (a SavedModel directory's files, an ONNX model's data)."""
  try:
    if os.path.isdir(path):
      return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
    return sum(os.path.getsize(p) for p in (path, path + ".data") if os.path.isfile(p))
  except OSError:
    return 0


def weight_bytes(graph) -> int:
  return sum(int(np.asarray(c).nbytes) for c in graph.constants.values())


def viewed(fmt: Format, model: Any, size_hint: int = 0) -> Prepared:
  """A normalised model with its view and its channel groups."""
  heap.give_back(size_hint)   # the model as read, and normalisation's copies
  graph = fmt.adapter.to_view(model)
  return Prepared(fmt, model, graph, groups_lib.analyse(graph, fmt.ops))


def rewrite(prepared: Prepared, plan: plan_lib.Plan) -> Any:
  """The pruned model (not yet validated or verified)."""
  return prepared.format.adapter.apply_edits(
      prepared.model, slicing.build_edits(prepared.analysis, plan, slicing.SLICE))
