"""Grow-and-prune (GaP, Ma et al. 2022), on the frozen graph.

The model is trained at full width with the pruned channels held at zero
(weight masks: what the oracle's masked model zeroes), so that at any moment it
computes exactly what the pruned model would. The pruned groups are cut into K
parts; in each phase one part is grown back to full width (its removed channels
restored with the original's weights), all weights are trained with
distillation for a phase, and the grown part is pruned back to its target
counts by the criterion on the trained weights. The parts take turns. After the
last phase every group is at its target, and the pipeline slices the model with
the final plan and checks it against this last state, masked, with the oracle.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Callable, Optional

from absl import logging
import numpy as np

from graph_prune import errors
from graph_prune import plan as plan_lib
from graph_prune.adapters import tf_model
from graph_prune.adapters import tf_trainable
from graph_prune.analysis import groups as groups_lib
from graph_prune.recover import data as data_lib
from graph_prune.recover import options as options_lib
from graph_prune.recover import train
from graph_prune.rewrite import slicing

# (model, plan, group ids) -> the plan with those groups' kept channels chosen
# again, by the criterion, on the model's weights (the pipeline hands it in).
Replan = Callable[[tf_model.TFModel, plan_lib.Plan, frozenset], plan_lib.Plan]


def parts_of(plan: plan_lib.Plan, count: int) -> list[frozenset]:
  """The pruned groups cut into at most `count` parts, round robin in graph order."""
  pruned = [g.group for g in plan.groups if len(g.keep) < g.channels]
  parts = [frozenset(pruned[i::count]) for i in range(count)]
  return [p for p in parts if p]


def _widened(plan: plan_lib.Plan, part: frozenset) -> plan_lib.Plan:
  return dataclasses.replace(plan, groups=tuple(
      dataclasses.replace(g, keep=tuple(range(g.channels))) if g.group in part else g
      for g in plan.groups))


def _masks(analysis: groups_lib.Analysis, plan: plan_lib.Plan) -> dict[str, np.ndarray]:
  try:
    masks = slicing.weight_masks(analysis, plan)
  except ValueError as e:
    raise errors.UsageError(f"--recover=gap trains the model at full width with masks, but {e}; "
                            "use --recover=distill") from None
  return {c: m for c, m in masks.items() if not m.all()}


def masked(model: tf_model.TFModel, analysis: groups_lib.Analysis,
           plan: plan_lib.Plan) -> tf_model.TFModel:
  """The full-width model with the plan's removed channels at zero (it computes what
  the pruned model computes)."""
  masks = _masks(analysis, plan)
  values = tf_trainable.constant_values(model, sorted(masks))
  return tf_trainable.with_values(model, {c: (values[c] * m).astype(values[c].dtype)
                                          for c, m in masks.items()})


def grow_and_prune(original: tf_model.TFModel, analysis: groups_lib.Analysis,
                   plan: plan_lib.Plan, replan: Replan, teacher, logits: str,
                   data: data_lib.Data, options: options_lib.Options,
                   checkpoint_dir: Optional[str] = None
                   ) -> tuple[tf_model.TFModel, plan_lib.Plan, dict]:
  """The trained full-width model with the final plan's channels at zero, the final
  plan, and the report."""
  parts = parts_of(plan, options.gap_parts)
  phases = max(1, options.train_steps // options.gap_phase_steps)
  start = time.perf_counter()
  first = _masks(analysis, plan)
  names = sorted(set(first) | {c for part in parts
                                for c in _masks(analysis, _widened(plan, part))})
  source = tf_trainable.constant_values(original, names)
  model = tf_trainable.with_values(original, {c: source[c] * first.get(c, True)
                                              for c in names})
  current = first
  history = []
  phase_options = dataclasses.replace(options, method=options_lib.DISTILL,
                                      train_steps=options.gap_phase_steps)
  for phase in range(phases):
    part = parts[phase % len(parts)]
    grown = _masks(analysis, _widened(plan, part))
    now = tf_trainable.constant_values(model, names)
    # Grow: the part's removed channels come back with the original's weights.
    model = tf_trainable.with_values(model, {
        c: np.where(current.get(c, True), now[c], np.where(grown.get(c, True), source[c], 0))
        .astype(now[c].dtype) for c in names})
    ckpt = os.path.join(checkpoint_dir, f"phase_{phase + 1}") if checkpoint_dir else None
    model, doc = train.train(teacher, model, logits, data, phase_options.reseeded(phase),
                             ckpt, masks=grown,
                             step_offset=phase * options.gap_phase_steps)
    # Prune the part back to its target counts on the trained weights.
    before = {g.group: g.keep for g in plan.groups}
    plan = replan(model, plan, part)
    current = _masks(analysis, plan)
    now = tf_trainable.constant_values(model, names)
    model = tf_trainable.with_values(model, {c: (now[c] * current.get(c, True)).astype(
        now[c].dtype) for c in names})
    changed = sum(len(set(before[g.group]) ^ set(g.keep)) // 2
                  for g in plan.groups if g.group in part)
    history.append({"phase": phase + 1, "grown_groups": sorted(part),
                    "channels_swapped": int(changed),
                    "final_loss": doc["history"][-1]["loss"] if doc["history"] else None,
                    "train_s": doc["train_s"]})
    logging.info("recover gap: phase %d/%d grew %d groups, swapped %d channels", phase + 1,
                 phases, len(part), changed)
  report = {"train_steps": phases * options.gap_phase_steps, "gap_parts": len(parts),
            "gap_phases": phases, "gap_phase_steps": options.gap_phase_steps,
            "temperature": options.temperature, "learning_rate": options.learning_rate,
            "train_s": round(time.perf_counter() - start, 3), "phases": history}
  if options.augment.on:
    report["augment"] = options.augment.to_json()
  return model, plan, report
