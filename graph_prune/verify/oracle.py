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
from typing import Mapping, Optional, Sequence

import numpy as np

from graph_prune import errors
from graph_prune.graph import view


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


# Sizes tried, in order, for input dims the graph leaves unknown (other than the
# batch): the first at which the original model runs is used.
SIZES = (8, 32, 64, 128, 256, 512)


def unknown_dims(graph: view.GraphView, shapes: Optional[Mapping[str, Sequence[int]]] = None) -> bool:
  """Whether some input has an unknown dim other than the batch that `shapes` does not give."""
  shapes = shapes or {}
  return any(s is None for t in graph.inputs if t not in shapes
             for s in (graph.shape(t) or (None, None))[1:])


def random_inputs(graph: view.GraphView, seed: int, batch: int = 2, size: int = SIZES[0],
                  shapes: Optional[Mapping[str, Sequence[int]]] = None) -> list[np.ndarray]:
  """Seeded inputs shaped like the graph inputs: standard-normal floats,
  non-negative integers, booleans half true. Shapes given in `shapes` win; an
  unknown batch is `batch`, any other unknown dim is `size`."""
  rng = np.random.default_rng(seed)
  shapes = shapes or {}
  out = []
  for t in graph.inputs:
    if t in shapes:
      dims = list(shapes[t])
    else:
      shape = graph.shape(t) or ()
      dims = [s if s is not None else batch if i == 0 else size for i, s in enumerate(shape)]
    dtype = np.dtype(graph.dtypes.get(t, "float32"))
    x = np.asarray(rng.standard_normal(dims))
    if dtype == np.bool_:
      x = x > 0
    elif np.issubdtype(dtype, np.floating):
      x = x.astype(dtype)
    else:
      x = np.abs(x * 10).astype(dtype)
    out.append(np.asarray(x))
  return out


def input_sets(graph: view.GraphView, seed: int, batch: int = 2, size: int = SIZES[0],
               shapes: Optional[Mapping[str, Sequence[int]]] = None) -> list[list[np.ndarray]]:
  """The oracle's input sets. Boolean inputs usually steer control flow (an If's
  condition): each is fed all-true in one set and all-false in another, so that
  every branch runs."""
  base = random_inputs(graph, seed, batch, size, shapes)
  flags = [i for i, t in enumerate(graph.inputs)
           if np.dtype(graph.dtypes.get(t, "float32")) == np.bool_]
  if not flags:
    return [base]
  sets = []
  for value in (True, False):
    inputs = list(base)
    for i in flags:
      inputs[i] = np.full(base[i].shape, value)
    sets.append(inputs)
  return sets


def max_diff(ref: Sequence[np.ndarray], got: Sequence[np.ndarray]) -> tuple[float, float]:
  """Largest absolute and relative (to max |ref|) difference over all outputs.

  Non-finite values count as equal only where both sides hold the same one
  (NaN and NaN, +inf and +inf); anywhere else a non-finite value is an infinite
  difference, so a NaN can never hide a mismatch.
  """
  max_abs, max_rel = 0.0, 0.0
  for r, g in zip(ref, got):
    r = np.asarray(r, dtype=np.float64)
    g = np.asarray(g, dtype=np.float64)
    if r.shape != g.shape:
      return float("inf"), float("inf")
    if not r.size:
      continue
    same = (r == g) | (np.isnan(r) & np.isnan(g))
    finite = np.isfinite(r) & np.isfinite(g)
    if not np.all(same | finite):
      return float("inf"), float("inf")
    both = finite & ~same
    a = float(np.max(np.abs(r[both] - g[both]))) if both.any() else 0.0
    scale = float(np.max(np.abs(r[np.isfinite(r)]))) if np.isfinite(r).any() else 0.0
    max_abs = max(max_abs, a)
    max_rel = max(max_rel, a / scale if scale > 0 else (0.0 if a == 0 else float("inf")))
  return max_abs, max_rel


def check_finite(outputs: Sequence[np.ndarray]) -> None:
  """Refuses outputs of the input model that hold NaN: nothing could be checked."""
  if any(np.isnan(np.asarray(b, dtype=np.float64)).any() for b in outputs
         if np.issubdtype(np.asarray(b).dtype, np.number)):
    raise errors.InputError("the input model computes NaN on the verification inputs, so "
                            "nothing could be checked; give realistic input sizes with "
                            "--input_shape, or fix the model's weights")


def compare(original: Sequence[Sequence[np.ndarray]], masked: Sequence[Sequence[np.ndarray]],
            pruned: Sequence[Sequence[np.ndarray]], sets: Sequence[Sequence[np.ndarray]],
            tolerance: float, seed: int) -> Verification:
  """The verdict from the three models' outputs on every input set (one list of
  outputs per set); the worst differences count."""
  max_abs = max_rel = eff_abs = eff_rel = 0.0
  samples = 0
  for base, ref, got, inputs in zip(original, masked, pruned, sets):
    a, r = max_diff(ref, got)
    ea, er = max_diff(base, ref)
    max_abs, max_rel = max(max_abs, a), max(max_rel, r)
    eff_abs, eff_rel = max(eff_abs, ea), max(eff_rel, er)
    samples += int(inputs[0].shape[0]) if inputs and inputs[0].ndim else 1
  return Verification(max_abs, max_rel, tolerance, bool(max_rel <= tolerance), eff_abs, eff_rel,
                      samples, seed)
