"""Reconstruction: accuracy back after pruning without a gradient step.

Numpy on activations that the format's own runner computes on calibration
samples, so TensorFlow and ONNX models are handled alike.

- bias: every layer that reads removed channels gets their mean contribution
  (measured on the original model) added to its bias, or to the per-channel
  shift or batch-norm mean right after it. For a removed channel whose
  activation is constant (a shift through a ReLU with dead weights) this is
  exact wherever the layer reads it without padding (dense, 1x1 or unpadded
  convolutions): the pruned model then equals the original.
- lsq: layer by layer in graph order, each layer's weight (and intercept) is
  re-fitted by ridge least squares so that, fed by the pruned model with every
  layer before it already re-fitted, it gives the original model's output at
  that point. Layers that do not depend on each other are fitted from the same
  pass over the samples.

Before a layer is fitted, its rows x weight product is checked against the
layer's real output in the runner; a layer whose geometry is not reproduced
exactly is skipped with the reason. After the fit, the original, the sliced
and the reconstructed models are compared on held-out samples; a reconstruction
that agrees less with the original than the slice did is refused.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import time
from typing import Any, Mapping, Optional

from absl import logging
import numpy as np

from graph_prune import errors
from graph_prune.calibration import activations
from graph_prune.graph.edits import Edits
from graph_prune.ops import geometry
from graph_prune.reconstruct import normal
from graph_prune.reconstruct import sites as sites_lib
from graph_prune.verify import agreement

BIAS, LSQ = sites_lib.BIAS, sites_lib.LSQ
METHODS = (BIAS, LSQ)
# Largest relative difference between rows x weight and the layer's output in
# the runner (float32 kernels differ by ~1e-6; a misread padding by far more).
_GEOMETRY_TOLERANCE = 1e-3


@dataclasses.dataclass(frozen=True)
class Options:
  method: str = LSQ
  ridge: float = 1e-3        # relative to the mean diagonal of each layer's P^T P
  max_rows: int = 1 << 17    # rows per layer; sampled evenly from all when more
  batch_size: int = 64
  seed: int = 0


def check(options: Options) -> None:
  if options.method not in METHODS:
    raise errors.UsageError(f"unknown --reconstruct '{options.method}'; choose "
                            f"{' or '.join(METHODS)}")
  if not (math.isfinite(options.ridge) and options.ridge >= 0):
    raise errors.UsageError(f"--reconstruct_ridge is {options.ridge}; give a number >= 0")
  if options.max_rows < 1 or options.batch_size < 1:
    raise errors.UsageError("--reconstruct_rows and the batch size must be at least 1")


@dataclasses.dataclass(frozen=True)
class Result:
  model: Any
  view: Any
  report: dict


def reconstruct(fmt, original: Any, original_view, pruned: Any, pruned_view,
                kept: Mapping[str, np.ndarray], samples, options: Options) -> Result:
  """The pruned model with re-fitted weights and shifts; raises ReconstructionError
  when the result agrees less with the original than the pruned model did."""
  check(options)
  start = time.perf_counter()
  found, skipped = sites_lib.find(original_view, pruned_view, fmt.ops, kept, options.method)
  work = _Work(fmt, original, original_view, pruned, pruned_view, samples, options)
  layers = []
  if options.method == BIAS:
    layers = work.bias(found, skipped)
  else:
    for wave in _waves(pruned_view, found):
      layers += work.lsq(wave, skipped)
  model, view = work.result()
  holdout = _holdout(fmt, original, original_view, pruned, pruned_view, model, view, samples,
                     options)
  doc = {"method": options.method, **samples.to_json(), "ridge": options.ridge,
         "max_rows": options.max_rows, "layers_refitted": len(layers),
         "layers": layers, "skipped": skipped, **holdout,
         "seconds": round(time.perf_counter() - start, 3)}
  before, after = holdout["holdout_before"], holdout["holdout_after"]
  worse = (after["agreement"] < before["agreement"] if before["agreement"] is not None
           else after["rel_error"] > before["rel_error"])
  if worse and layers:
    what = ("top-1 agreement with the original {:.2%} -> {:.2%}".format(
        before["agreement"], after["agreement"]) if before["agreement"] is not None else
        f"relative error to the original {before['rel_error']:.3g} -> {after['rel_error']:.3g}")
    hint = ("raise --reconstruct_ridge or try --reconstruct=bias" if options.method == LSQ
            else "or prune without --reconstruct")
    raise errors.ReconstructionError(
        f"--reconstruct={options.method} made the pruned model worse on "
        f"{doc['holdout_samples']} held-out samples ({what}); nothing written. Give more or "
        f"more typical --calibration_data, {hint}")
  logging.info("reconstruct %s: %d layers re-fitted, %d skipped, %.1f s", options.method,
               len(layers), len(skipped), doc["seconds"])
  return Result(model, view, doc)


def refit_layers(fmt, model: Any, view, found: list[sites_lib.Site], samples,
                 options: Options, solve, preset: Mapping[str, np.ndarray]
                 ) -> tuple[Any, Any, list[dict], list[str], dict[str, np.ndarray]]:
  """Replaces the weight of each site of one model (sites_lib.every) layer by
  layer in graph order: `solve` (see _Work.refit) gets each layer's normal
  equations for matching the model's own output there, fed by the model with the
  layers before it already replaced, so errors do not accumulate. `preset`:
  constants replaced before the first layer. Returns the model, its view, the
  solver's report entries, the layers skipped (with why) and every constant
  replaced."""
  check(options)
  work = _Work(fmt, model, view, model, view, samples, options)
  work.updates.update(preset)
  layers: list[dict] = []
  skipped: list[str] = []
  for wave in _waves(view, found):
    layers += work.refit(wave, skipped, solve)
  new_model, new_view = work.result()
  return new_model, new_view, layers, skipped, dict(work.updates)


def _waves(graph, found: list[sites_lib.Site]) -> list[list[sites_lib.Site]]:
  """Sites in graph order, cut into waves: no site depends on another of its wave,
  so one pass over the samples serves a whole wave."""
  index = {s.node: i for i, s in enumerate(found)}
  above: dict[str, int] = {}    # tensor -> bit set of the sites it depends on
  for node in graph.nodes:
    bits = 0
    for t in node.inputs + node.captures:
      bits |= above.get(t, 0)
    if node.name in index:
      bits |= 1 << index[node.name]
    for t in node.outputs:
      above[t] = bits
  waves: list[list[sites_lib.Site]] = []
  members = 0
  for i, site in enumerate(found):
    needs = above.get(site.x, 0)
    if not waves or needs & members:
      waves.append([])
      members = 0
    waves[-1].append(site)
    members |= 1 << i
  return waves


class _Work:
  """The current (partly re-fitted) pruned model and the runs that feed the fits."""

  def __init__(self, fmt, original, original_view, pruned, pruned_view, samples,
               options: Options):
    self.fmt, self.options, self.samples = fmt, options, samples
    self.original, self.original_view = original, original_view
    self.pruned, self.pruned_view = pruned, pruned_view
    self.updates: dict[str, np.ndarray] = {}
    self.rng = np.random.default_rng(options.seed)
    self.fixed = activations.fixed_batch(pruned_view)

  # --- models --------------------------------------------------------------------

  def _runner(self, which: str, extra: list[str]):
    adapter = self.fmt.adapter
    if which == "original":
      return activations.runner(adapter, self.original, extra, self.original_view.constants)
    arrays = collections.ChainMap(self.updates, self.pruned_view.constants)
    model = self.pruned
    if self.updates and not getattr(adapter, "RUNS_WITH_WEIGHTS", False):
      model = adapter.apply_edits(self.pruned, Edits(dict(self.updates), {}, ()))
    return activations.runner(adapter, model, extra, arrays)

  def result(self):
    if not self.updates:
      return self.pruned, self.pruned_view
    model = self.fmt.adapter.apply_edits(self.pruned, Edits(dict(self.updates), {}, ()))
    return model, self.fmt.adapter.to_view(model)

  def _const(self, name: str) -> np.ndarray:
    return self.updates[name] if name in self.updates else self.pruned_view.constants[name]

  # --- rows ----------------------------------------------------------------------

  def _picks(self, site, layer: geometry.Layer, x_shape, count: int, need: int
             ) -> Optional[np.ndarray]:
    """Which rows of this batch to use: all, or an even random share when the
    whole calibration set gives more than max_rows. `need`: rows the fit needs."""
    per_sample = math.prod(geometry.output_positions(layer, x_shape))
    total = per_sample * len(self.samples.fit)
    if min(total, self.options.max_rows) < need:
      if total < need:
        raise errors.InputError(
            f"layer '{site.node}' keeps {layer.features} inputs per output; its "
            f"least-squares fit needs at least {need} rows, and {len(self.samples.fit)} "
            f"calibration samples give {total}: give at least {-(-need // max(per_sample, 1))} "
            "samples")
      raise errors.UsageError(f"layer '{site.node}' needs at least {need} rows for its "
                              f"fit; raise --reconstruct_rows (now {self.options.max_rows})")
    if total <= self.options.max_rows:
      return None
    rows = per_sample * count
    take = min(rows, max(1, round(rows * self.options.max_rows / total)))
    return np.sort(self.rng.choice(rows, size=take, replace=False))

  def _target(self, site, z_o: np.ndarray, picks) -> np.ndarray:
    """The original layer's output on the kept channels (its own bias taken off),
    as rows grouped like the pruned layer."""
    lin_o = site.original.lin
    axis = lin_o.channel_axis % z_o.ndim
    if lin_o.bias:
      bias = self.original_view.constants[lin_o.bias].reshape(-1)
      shape = [1] * z_o.ndim
      shape[axis] = -1
      z_o = z_o - bias.reshape(shape)
    if site.kept_out is not None:
      z_o = np.take(z_o, site.kept_out, axis=axis)
    return geometry.outputs(z_o, site.pruned, picks)

  @staticmethod
  def _check(layer: geometry.Layer, x: np.ndarray, z: np.ndarray, weights: np.ndarray,
             bias: Optional[np.ndarray]) -> Optional[str]:
    """Why rows x weight (+ the layer's own bias) does not reproduce the layer's
    output in the runner, or None."""
    take = x[:4]
    got = np.einsum("rgf,gfo->rgo", geometry.rows(take, layer),
                    geometry.matrix(weights, layer).astype(np.float32))
    want = geometry.outputs(z[:len(take)], layer)
    if bias is not None:
      want = want - bias.reshape(1, layer.groups, -1)
    if got.shape != want.shape:
      return f"rows x weight gives {got.shape[1:]}, the layer {want.shape[1:]}"
    scale = float(np.max(np.abs(want))) if want.size else 0.0
    diff = float(np.max(np.abs(got - want))) if want.size else 0.0
    if diff > _GEOMETRY_TOLERANCE * max(scale, 1e-30):
      return (f"its inputs as rows x weight do not reproduce its output (relative "
              f"difference {diff / max(scale, 1e-30):.2g}); not re-fitted")
    return None

  # --- lsq -----------------------------------------------------------------------

  def lsq(self, wave: list[sites_lib.Site], skipped: list[str]) -> list[dict]:
    """Re-fits the layers of one wave by ridge least squares."""
    def solve(site, fit: normal.Normal, w_now: np.ndarray):
      found = fit.solve(geometry.matrix(w_now, site.pruned), self.options.ridge)
      if not found.rel_error_after < found.rel_error_before:
        return "the fit is no better than the slice; kept as sliced"
      return (geometry.weight(found.weight, site.pruned, w_now.dtype), found.intercept,
              _layer_doc(site, found.rows, found.rel_error_before, found.rel_error_after))
    return self.refit(wave, skipped, solve)

  def refit(self, wave: list[sites_lib.Site], skipped: list[str], solve) -> list[dict]:
    """Re-fits the layers of one wave from one pass over the samples: for each
    layer, the normal equations of its rows (fed by the current model) against
    the original model's output are summed, then `solve(site, normal, weight)`
    gives (new weight, intercept [G, O] or None, report entry) or why not."""
    orig = self._runner("original", [s.z for s in wave])
    cur = self._runner("pruned", [t for s in wave for t in (s.x, s.z)])
    fits: dict[str, normal.Normal] = {}
    dropped: set[str] = set()
    try:
      o_batches = activations.batches(orig, self.samples.fit, self.options.batch_size,
                                      self.fixed)
      p_batches = activations.batches(cur, self.samples.fit, self.options.batch_size,
                                      self.fixed)
      for (xb, outs_o), (_, outs_p) in zip(o_batches, p_batches):
        zs_o = outs_o[len(outs_o) - len(wave):]
        xz_p = outs_p[len(outs_p) - 2 * len(wave):]
        for i, site in enumerate(wave):
          if site.node in dropped:
            continue
          x_p, z_p = xz_p[2 * i], xz_p[2 * i + 1]
          layer = site.pruned
          if site.node not in fits:
            why = self._check(layer, x_p, z_p, self._const(layer.lin.weight),
                              self._const(layer.lin.bias) if layer.lin.bias else None)
            if why:
              skipped.append(f"{site.node}: {why}")
              dropped.add(site.node)
              continue
            fits[site.node] = normal.Normal(layer.groups, layer.features,
                                            layer.outputs // layer.groups,
                                            site.shift is not None)
          picks = self._picks(site, layer, x_p.shape, len(xb),
                              normal.needed_rows(layer.features, site.shift is not None))
          fits[site.node].add(geometry.rows(x_p, layer, picks),
                              self._target(site, zs_o[i], picks))
    finally:
      orig.close()
      cur.close()
    done = []
    for site in wave:
      if site.node not in fits:
        continue
      found = solve(site, fits[site.node], self._const(site.pruned.lin.weight))
      if isinstance(found, str):
        skipped.append(f"{site.node}: {found}")
        continue
      w, intercept, doc = found
      self.updates[site.pruned.lin.weight] = w
      if site.shift is not None and intercept is not None:
        self._add_to_shift(site, np.asarray(intercept).reshape(-1))
      done.append(doc)
    return done

  def _add_to_shift(self, site, c: np.ndarray) -> None:
    shift = site.shift
    value = self._const(shift.const)
    if shift.factor:
      c = c * self._const(shift.factor).reshape(-1).astype(np.float64)
    new = value.reshape(-1).astype(np.float64) + shift.sign * c
    self.updates[shift.const] = new.reshape(value.shape).astype(value.dtype)

  # --- bias ----------------------------------------------------------------------

  def bias(self, found: list[sites_lib.Site], skipped: list[str]) -> list[dict]:
    """Adds the removed inputs' mean contribution of every site to its shift, from
    one pass of the original model."""
    if not found:
      return []
    orig = self._runner("original", [t for s in found for t in (s.x, s.z)])
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    dropped: set[str] = set()
    try:
      for xb, outs in activations.batches(orig, self.samples.fit, self.options.batch_size,
                                          self.fixed):
        xz = outs[len(outs) - 2 * len(found):]
        for i, site in enumerate(found):
          if site.node in dropped:
            continue
          x_o, z_o = xz[2 * i], xz[2 * i + 1]
          layer = site.original
          if site.node not in sums:
            consts = self.original_view.constants
            why = self._check(layer, x_o, z_o, consts[layer.lin.weight],
                              consts[layer.lin.bias] if layer.lin.bias else None)
            if why:
              skipped.append(f"{site.node}: {why}")
              dropped.add(site.node)
              continue
            sums[site.node] = np.zeros((layer.groups, layer.features))
            counts[site.node] = 0
          picks = self._picks(site, layer, x_o.shape, len(xb), 1)
          p = geometry.rows(x_o, layer, picks)
          sums[site.node] += p.sum(axis=0, dtype=np.float64)
          counts[site.node] += len(p)
    finally:
      orig.close()
    done = []
    for site in found:
      if site.node not in sums:
        continue
      layer = site.original
      mean = sums[site.node] / max(counts[site.node], 1)            # [G, F]
      m = geometry.matrix(self.original_view.constants[layer.lin.weight], layer)
      removed = _removed_features(site, layer)                       # [G, F]
      c = np.einsum("gf,gfo->go", mean * removed, m.astype(np.float64)).reshape(-1)
      if site.kept_out is not None:
        c = c[site.kept_out]
      self._add_to_shift(site, c)
      done.append(_layer_doc(site, counts[site.node], None, None,
                             inputs_removed=int(layer.groups * layer.fan_in -
                                                len(site.kept_in))))
    return done


def _removed_features(site, layer: geometry.Layer) -> np.ndarray:
  """[G, F] 1.0 where the original layer's feature reads a removed channel."""
  total = layer.groups * layer.fan_in
  keep = np.zeros(total, bool)
  keep[site.kept_in if site.kept_in is not None else slice(None)] = True
  per_group = (~keep).reshape(layer.groups, layer.fan_in)          # [G, cin]
  kernel = math.prod(layer.lin.kernel)
  return np.tile(per_group, (1, kernel)).astype(np.float64)         # features: kernel-major


def _layer_doc(site, rows: int, before: Optional[float], after: Optional[float],
               **extra) -> dict:
  doc = {"node": site.node, "inputs_kept": site.pruned.features, "rows": int(rows),
         "intercept_into": site.shift.const if site.shift else None, **extra}
  if before is not None:
    doc.update(rel_error_before=round(before, 6), rel_error_after=round(after, 6))
  return doc


def _holdout(fmt, original, original_view, pruned, pruned_view, model, view, samples,
             options: Options) -> dict:
  """The sliced and the reconstructed model against the original on held-out samples."""
  x = samples.measuring()
  adapter = fmt.adapter
  before, after = agreement.against_first(
      [lambda: activations.runner(adapter, original, (), original_view.constants),
       lambda: activations.runner(adapter, pruned, (), pruned_view.constants),
       lambda: activations.runner(adapter, model, (), view.constants)],
      x, options.batch_size, activations.fixed_batch(pruned_view))
  return {"holdout_samples": int(len(x)), "holdout_before": before, "holdout_after": after}
