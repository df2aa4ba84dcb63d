"""The numerical oracle: the pruned model must compute what the masked original computes.

The masked original has every removed channel zeroed in the weights that
create it and cut (zeroed) in the weights of every layer that reads it. So a
removed channel whose activation is a non-zero constant (a bias, a batch-norm
shift through ReLU) is dropped in both models alike and the check is exact;
its constant contribution is not folded into the consumer's bias. How far
pruning moved the outputs is reported separately (masked versus original).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

from graph_prune.graph import view

Run = Callable[[Sequence[np.ndarray]], Sequence[np.ndarray]]

METHOD = ("masked original (removed channels zeroed at their producers and cut at every "
          "consumer) versus pruned model; constant activations of removed channels are "
          "dropped in both, not folded into consumer biases")


@dataclasses.dataclass(frozen=True)
class Verification:
  max_abs_diff: float
  max_rel_diff: float       # max |pruned - masked| / max |masked|, over all outputs
  tolerance: float
  passed: bool
  effect_max_abs: float     # max |masked - original|: how much pruning changed outputs
  effect_max_rel: float
  samples: int
  seed: int
  method: str = METHOD


def random_inputs(graph: view.GraphView, seed: int, batch: int = 2) -> list[np.ndarray]:
  """Seeded standard-normal inputs shaped like the graph inputs (unknown dims: batch)."""
  rng = np.random.default_rng(seed)
  out = []
  for t in graph.inputs:
    shape = graph.shape(t) or ()
    dims = [batch if s is None else s for s in shape]
    dtype = np.dtype(graph.dtypes.get(t, "float32"))
    x = rng.standard_normal(dims)
    out.append(x.astype(dtype) if np.issubdtype(dtype, np.floating) else
               np.abs(x * 10).astype(dtype))
  return out


def max_diff(ref: Sequence[np.ndarray], got: Sequence[np.ndarray]) -> tuple[float, float]:
  """Largest absolute and relative (to max |ref|) difference over all outputs."""
  max_abs, max_rel = 0.0, 0.0
  for r, g in zip(ref, got):
    r = np.asarray(r, dtype=np.float64)
    g = np.asarray(g, dtype=np.float64)
    if r.shape != g.shape:
      return float("inf"), float("inf")
    a = float(np.max(np.abs(r - g))) if r.size else 0.0
    scale = float(np.max(np.abs(r))) if r.size else 0.0
    max_abs = max(max_abs, a)
    max_rel = max(max_rel, a / scale if scale > 0 else (0.0 if a == 0 else float("inf")))
  return max_abs, max_rel


def verify(original: Run, masked: Run, pruned: Run, inputs: Sequence[np.ndarray],
           tolerance: float, seed: int) -> Verification:
  ref = masked(inputs)
  got = pruned(inputs)
  base = original(inputs)
  max_abs, max_rel = max_diff(ref, got)
  eff_abs, eff_rel = max_diff(base, ref)
  batch = int(inputs[0].shape[0]) if inputs and inputs[0].ndim else 1
  return Verification(max_abs, max_rel, tolerance, bool(max_rel <= tolerance), eff_abs, eff_rel,
                      batch, seed)
