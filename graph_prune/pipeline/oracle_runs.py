"""The oracle's runs: the original, the masked original and the pruned model on
the same seeded inputs, one model at a time, and what they need (the masked
original, the tensors compared, the inputs at a size the original runs at)."""

from __future__ import annotations

import collections
from typing import Any

import numpy as np

from graph_prune import errors
from graph_prune import plan as plan_lib
from graph_prune.analysis import groups as groups_lib
from graph_prune.graph.edits import Edits
from graph_prune.pipeline.options import Options
from graph_prune.rewrite import slicing
from graph_prune.verify import oracle


class Checked:
  """A runner whose failures say which of the oracle's models failed: the original
  failing is a problem of the input (or of the inputs the oracle made up for it);
  the masked or pruned model failing is a failed verification."""

  def __init__(self, what: str, make, model):
    self.what = what
    self._runner = None
    self._runner = self._guard(make, model)

  def _guard(self, fn, *args):
    try:
      return fn(*args)
    except errors.RunError as e:
      if self.what == "original":
        raise errors.InputError(f"the input model does not run on the verification inputs: {e}; "
                                "give the input shape with --input_shape") from None
      raise errors.VerificationError(f"verification failed: the {self.what} model does not run: "
                                     f"{e}; nothing written") from None

  def __call__(self, feeds):
    return self._guard(self._runner, feeds)

  def close(self):
    if self._runner is not None:
      self._runner.close()


def oracle_inputs(graph, original: "Checked", options: Options) -> list[list[np.ndarray]]:
  """The oracle's input sets. Input dims the graph leaves unknown (besides the
  batch) and --input_shape does not give take the first of oracle.SIZES at which
  the original model runs: a 5x5 or an unpadded convolution needs more than a
  few pixels, and a larger input only costs time."""
  shapes = _input_shapes(graph, options)
  if not oracle.unknown_dims(graph, shapes):
    return oracle.input_sets(graph, options.seed, shapes=shapes)
  failure = None
  for size in oracle.SIZES:
    sets = oracle.input_sets(graph, options.seed, size=size, shapes=shapes)
    try:
      for inputs in sets:
        original(inputs)
      return sets
    except (errors.InputError, errors.VerificationError) as e:
      failure = e
  raise type(failure)(f"{failure} (unknown input dims tried at sizes "
                      f"{', '.join(map(str, oracle.SIZES))})")


def _input_shapes(graph, options: Options) -> dict[str, tuple[int, ...]]:
  shapes = {}
  for name, dims in options.input_shapes:
    if not name:
      if len(graph.inputs) != 1:
        raise errors.UsageError(f"the model has {len(graph.inputs)} inputs; name the one each "
                                "--input_shape is for: NAME:D0,D1,...")
      name = graph.inputs[0]
    match = [t for t in graph.inputs if t == name or t.split(":")[0] == name]
    if not match:
      raise errors.UsageError(f"--input_shape names '{name}', which is not a model input; "
                              f"inputs: {', '.join(graph.inputs)}")
    known = graph.shape(match[0])
    if known is not None and (len(known) != len(dims) or any(
        k is not None and k != d for k, d in zip(known, dims))):
      raise errors.UsageError(f"--input_shape {list(dims)} does not fit input '{match[0]}' of "
                              f"shape {['?' if k is None else k for k in known]}")
    shapes[match[0]] = tuple(dims)
  return shapes


def _probes(graph, cut) -> list[str]:
  """Tensors the oracle compares besides the outputs: the computed inputs of the
  ops that produce them (the logits under a Softmax, say), which pruning leaves
  whole. An output squashed to 0 and 1 in float32 hides any difference; its
  input does not."""
  probes = []
  for out in graph.outputs:
    node = graph.producer(out)
    for t in (node.inputs if node is not None else ()):
      if (t not in graph.constants and t not in graph.outputs and t not in cut and
          t not in probes and graph.producer(t) is not None and
          np.issubdtype(np.dtype(graph.dtypes.get(t, "int32")), np.floating)):
        probes.append(t)
  return probes


def run_oracle(adapter, original, masked, pruned, graph, options: Options,
               cut=frozenset(), pruned_graph=None) -> oracle.Verification:
  """Runs the original, the masked original and the pruned model on the same
  seeded inputs, one model at a time (so that no two of them are in memory as
  runnable graphs at once); raises VerificationError (nothing is written) when
  they disagree. `masked` is the masked model, or its weight edits (an Edits that
  only changes constants: the original is run with them, and no masked copy of
  the model is made). The views' constants are handed to the runners, which feed
  the large weights from them instead of decoding another copy."""
  probes = _probes(graph, cut)
  masked_arrays, in_place = None, None
  if isinstance(masked, slicing.InPlaceMask):
    in_place, masked_arrays, masked = masked, graph.constants, original
  elif isinstance(masked, Edits):
    masked_arrays = collections.ChainMap(dict(masked.constants), graph.constants)
    masked = original
  runs = (("original", original, graph.constants), ("masked original", masked, masked_arrays),
          ("pruned", pruned, pruned_graph.constants if pruned_graph is not None else None))
  outputs, sets = [], None
  for what, model, arrays in runs:
    borrowed = in_place is not None and what == "masked original"
    runner = saved = None
    try:
      if borrowed:
        saved = in_place.zero(graph.constants)
      runner = Checked(what, lambda m, a=arrays: adapter.Runner(m, probes, optimize=False,
                                                                 arrays=a), model)
      if sets is None:
        sets = oracle_inputs(graph, runner, options)
      outputs.append([runner(inputs) for inputs in sets])
    finally:
      if runner is not None:
        runner.close()
      del runner
      if borrowed:
        # The view's arrays get their values back: from the file zero() saved them
        # to, else from the model's own constants.
        in_place.restore(graph.constants, saved,
                         lambda: adapter.constants(original, in_place.cuts))
    if what == "original":
      for out in outputs[0]:
        oracle.check_finite(out)
  verification = oracle.compare(*outputs, sets, options.tolerance, options.seed)
  if not verification.passed:
    raise errors.VerificationError(
        f"verification failed: pruned differs from the masked original by "
        f"{verification.max_rel_diff:.3g} (relative; tolerance {options.tolerance:g}); "
        "nothing written")
  return verification


def kept_positions(analysis: groups_lib.Analysis, plan: plan_lib.Plan) -> dict[str, np.ndarray]:
  """For every tensor whose channels the plan cuts: the positions it keeps."""
  gone = analysis.removed_elements(plan.removed_units())
  out = {}
  for tensor, dim in analysis.dims.items():
    cut = gone[dim.units]
    if cut.any():
      out[tensor] = np.flatnonzero(~cut)
  return out


def validated_view(adapter, pruned: Any):
  """The pruned model's view: re-reading it runs the format's shape inference, which
  validates the rewrite (VerificationError when it fails)."""
  try:
    return adapter.to_view(pruned)
  except (ValueError, errors.InputError) as e:
    raise errors.VerificationError(f"the pruned graph is invalid ({str(e).splitlines()[0][:300]}); "
                                   "please report this model") from None


def masked_model(adapter, model: Any, analysis: groups_lib.Analysis, plan: plan_lib.Plan):
  """The oracle's masked original for a channel plan (masked_from). Where the adapter
  feeds a model's weights from the view's arrays and the masking only zeroes
  weights, the cuts themselves (slicing.InPlaceMask): run_oracle zeroes the view's
  arrays for the masked run and restores them from the model after it, so the
  masked weights take no memory of their own."""
  if getattr(adapter, "RUNS_WITH_WEIGHTS", False):
    in_place = slicing.in_place_mask(analysis, plan)
    if in_place is not None:
      return in_place
  return masked_from(adapter, model, slicing.build_edits(analysis, plan, slicing.MASK))


def masked_from(adapter, model: Any, masked: Edits):
  """The masking edits themselves where the adapter runs a model with its weights
  fed and only constants change (no masked copy of the model), else the masked
  model."""
  if (masked.new_constants or masked.rewires or masked.attrs or
      not getattr(adapter, "RUNS_WITH_WEIGHTS", False)):
    return adapter.apply_edits(model, masked)
  return masked
