"""Quantization after pruning: the model in its output format is quantized by the
scheme asked for, then measured against the float model it came from on held-out
calibration samples. Quantization cannot be verified exactly, so it is measured:
top-1 agreement (first output, when it scores classes), relative error and the
largest relative difference; below the threshold nothing is written.

Schemes (ONNX outputs): int8 (ONNX Runtime's static QDQ quantizer, per-channel
weights, activation ranges from the calibration samples), float16 (weights and
compute, float32 inputs and outputs), codebook8 and codebook4 (per-layer k-means
of the linear layers' weights: quantize/codebook.py). TensorFlow GraphDef and
SavedModel outputs, kept for XLA: bfloat16 and float16 (adapters/tf_cast.py).
"""

from __future__ import annotations

import time
from typing import Any

from absl import logging
import numpy as np

from graph_prune import errors
from graph_prune.calibration import activations
from graph_prune.quantize import codebook as codebook_lib
from graph_prune.quantize import options as options_lib
from graph_prune.verify import agreement as agreement_lib

Options = options_lib.Options
check = options_lib.check


def _quantizer(fmt):
  if fmt.name != "onnx":
    raise errors.UsageError("--quantize writes ONNX models; for a TensorFlow model give "
                            "--out_format=onnx")
  from graph_prune.adapters import onnx_quantize  # pylint: disable=g-import-not-at-top
  return onnx_quantize


def _half_tf(model: Any, options: Options) -> tuple[Any, dict]:
  if options.scheme not in options_lib.TF_SCHEMES:
    raise errors.UsageError(f"--quantize={options.scheme} writes ONNX or LiteRT models; a "
                            "GraphDef or SavedModel takes bfloat16 or float16")
  from graph_prune.adapters import tf_cast  # pylint: disable=g-import-not-at-top
  return tf_cast.cast(model, options.scheme), {
      "tool": f"graph_prune tf_cast (weights and compute {options.scheme}, float32 inputs "
              "and outputs; run under XLA)"}


def linear_weights(fmt, graph) -> list[str]:
  """The constant float weights (two or more axes) of the graph's linear layers,
  each once, in graph order."""
  out = []
  for node in graph.nodes:
    lin = fmt.ops.linear(graph, node)
    if lin is None or lin.weight in out or lin.weight not in graph.constants:
      continue
    w = graph.constants[lin.weight]
    if np.issubdtype(w.dtype, np.floating) and w.ndim >= 2:
      out.append(lin.weight)
  return out


def _equal_batches(x: np.ndarray, size: int) -> list[np.ndarray]:
  """Batches of one size (the percentile and entropy calibrators stack them): the
  remainder past the last full batch is left out."""
  size = min(size, len(x))
  return [x[i:i + size] for i in range(0, len(x) - size + 1, size)]


def _codebook(fmt, model, graph, samples, options: Options, q) -> tuple[Any, dict]:
  bits = options.bits
  names = linear_weights(fmt, graph)
  if not names:
    raise errors.UsageError("--quantize=codebook: the model has no linear layer with a "
                            "constant weight to store as a codebook")
  floats = {name: graph.constants[name] for name in names}
  tables = {name: codebook_lib.fit(w, bits, options.kmeans_iterations)
            for name, w in floats.items()}
  fitted: dict = {"codebook_fit": "kmeans"}
  if options.codebook_fit == "outputs":
    model, tables, fitted = _fit_outputs(fmt, model, graph, tables, samples, options)
  layers = []
  float_bytes = stored_bytes = 0
  packed = bits == 4 and q.packs4(model)
  for name, t in tables.items():
    w = floats[name]
    float_bytes += w.nbytes
    stored_bytes += t.stored(packed).nbytes + t.codebook.nbytes
    layers.append({"weight": name, "elements": int(w.size), "centroids": int(len(t.codebook)),
                   "iterations": t.iterations,
                   "rel_error": round(codebook_lib.rel_error(w, t), 6),
                   **fitted.get("layers", {}).get(name, {})})
  errs = [lay["rel_error"] for lay in layers]
  doc = {"bits": bits, "packed": packed, "init": "linear (min to max)",
         "max_iterations": options.kmeans_iterations, "weights": len(names),
         "weight_bytes_float": int(float_bytes), "weight_bytes_stored": int(stored_bytes),
         "weight_compression": round(float_bytes / stored_bytes, 3),
         "weight_rel_error_mean": round(float(np.mean(errs)), 6),
         "weight_rel_error_max": round(float(np.max(errs)), 6),
         **{k: v for k, v in fitted.items() if k != "layers"}, "layers": layers}
  return q.codebook(model, tables), doc


def _fit_outputs(fmt, model, graph, kmeans: dict, samples, options: Options):
  """Each layer's codebook fitted to its outputs (codebook.fit_outputs), layer by
  layer in graph order, fed by the model with the layers before it already
  quantized; its intercept takes the mean residual. A layer that cannot be fitted
  (or whose fit is no better on the calibration rows) keeps its k-means table.
  Returns the model with the new intercepts, the tables and the report part."""
  from graph_prune.ops import geometry  # pylint: disable=g-import-not-at-top
  from graph_prune.reconstruct import reconstruct  # pylint: disable=g-import-not-at-top
  from graph_prune.reconstruct import sites as sites_lib  # pylint: disable=g-import-not-at-top
  rec = reconstruct.Options(reconstruct.LSQ, batch_size=options.batch_size)
  found, skipped = sites_lib.every(graph, fmt.ops, set(kmeans))
  sited = {s.pruned.lin.weight for s in found}
  # Layers without a site are quantized (k-means) before the first fit.
  preset = {n: t.weight() for n, t in kmeans.items() if n not in sited}
  tables = dict(kmeans)

  def solve(site, normal, w_now):
    layer = site.pruned
    name = layer.lin.weight
    h, rhs = normal.system(geometry.matrix(w_now, layer), rec.ridge)
    w_star = np.linalg.solve(h, rhs)
    fit = codebook_lib.fit_outputs(w_star, h, options.bits, iterations=options.kmeans_iterations)
    table = codebook_lib.Table(fit.codebook.astype(w_now.dtype),
                               geometry.weight(fit.assign, layer, np.uint8).reshape(-1),
                               tuple(w_now.shape), options.bits, fit.rounds)
    q_fit = geometry.matrix(table.weight(), layer).astype(np.float64)
    q_plain = geometry.matrix(kmeans[name].weight(), layer).astype(np.float64)
    before = normal.error(q_plain, intercept=False)
    after = normal.error(q_fit)
    doc = {"weight": name, "node": site.node, "rows": normal.rows,
           "output_rel_error_kmeans": round(before, 6)}
    if not after < before:   # the k-means table, as without calibration data
      return kmeans[name].weight(), None, dict(doc, output_rel_error=round(before, 6),
                                               fit="kmeans (the fit was no better)")
    tables[name] = table
    return table.weight(), normal.intercept_for(q_fit), dict(
        doc, output_rel_error=round(after, 6), fit="outputs", rounds=fit.rounds,
        intercept_into=site.shift.const if site.shift else None)

  model, _, done, dropped, _ = reconstruct.refit_layers(
      fmt, model, graph, found, samples, rec, solve, preset)
  for line in skipped + dropped:
    logging.info("codebook: %s (k-means table kept)", line)
  fitted = sum(d["fit"] == "outputs" for d in done)
  return model, tables, {
      "codebook_fit": "outputs", "calibration_samples_fit": int(len(samples.fit)),
      "layers_fitted": fitted, "layers_kmeans": len(kmeans) - fitted,
      "not_fitted": skipped + dropped, "layers": {d.pop("weight"): d for d in done}}


def quantize(fmt, model: Any, graph, samples, options: Options) -> tuple[Any, dict]:
  """The quantized model and its report. `graph` is the float model's view,
  `samples` (calibration.samples.Samples) its calibration samples: int8 ranges
  come from samples.fit, the measurement uses samples.holdout. Raises
  QuantizationError when agreement is below options.min_agreement."""
  check(options)
  t0 = time.perf_counter()
  if fmt.name == "tensorflow":
    quantized, doc = _half_tf(model, options)
  else:
    quantized, doc = _onnx_scheme(fmt, model, graph, samples, options)
  doc["quantize_s"] = round(time.perf_counter() - t0, 3)
  return quantized, measured(fmt, model, graph, fmt, quantized, samples, options, doc)


def _onnx_scheme(fmt, model: Any, graph, samples, options: Options) -> tuple[Any, dict]:
  q = _quantizer(fmt)
  doc: dict = {}
  if options.scheme == "bfloat16":
    raise errors.UsageError("--quantize=bfloat16 is for TensorFlow GraphDef and SavedModel "
                            "outputs run by XLA (ONNX Runtime's CPU provider has few bfloat16 "
                            "kernels); for ONNX use float16 or int8")
  if options.scheme == "int8":
    batches = _equal_batches(samples.fit, options.batch_size)
    quantized = q.int8(model, batches, options.method, options.per_channel)
    left = q.float_linear_ops(quantized)
    total = len(linear_weights(fmt, graph))
    if total and len(left) == total:
      raise errors.UsageError(f"--quantize=int8: ONNX Runtime's quantizer quantized none of the "
                              f"model's linear layers ({', '.join(sorted(set(left)))} stay "
                              "float)")
    doc.update(method=options.method, per_channel=options.per_channel, tool="onnxruntime "
               "quantize_static (QDQ, weights int8, activations uint8)",
               calibration_samples=int(sum(len(b) for b in batches)),
               linear_layers=total, linear_layers_float=len(left),
               float_ops=sorted(set(left)))
  elif options.scheme == "float16":
    quantized = q.float16(model)
    doc.update(tool="onnxruntime.transformers.float16 (float32 inputs and outputs)")
  else:
    quantized, extra = _codebook(fmt, model, graph, samples, options, q)
    doc.update(extra)
  return quantized, doc


def measured(ref_fmt, reference: Any, ref_graph, fmt, quantized: Any, samples,
             options: Options, doc: dict) -> dict:
  """`doc` completed with the file sizes and the measurement of `quantized` (format
  `fmt`) against the float `reference` (format ref_fmt, seen as ref_graph) on the
  held-out samples; QuantizationError below options.min_agreement."""
  doc = dict(doc, scheme=options.scheme, format=fmt.name,
             model_bytes_before=_bytes(reference), model_bytes_after=_bytes(quantized))
  doc["size_ratio"] = round(doc["model_bytes_before"] / max(doc["model_bytes_after"], 1), 3)
  t1 = time.perf_counter()
  doc.update(_measure(ref_fmt, reference, ref_graph, fmt, quantized, samples, options))
  doc["measure_s"] = round(time.perf_counter() - t1, 3)
  a = doc["holdout"]["agreement"]
  logging.info("quantize %s: %s -> %s bytes; on %d held-out samples agreement %s, relative "
               "error %.3g", options.scheme, doc["model_bytes_before"], doc["model_bytes_after"],
               doc["holdout_samples"], "n/a" if a is None else f"{a:.4f}",
               doc["holdout"]["rel_error"])
  if a is not None and a < options.min_agreement:
    raise errors.QuantizationError(
        f"--quantize={options.scheme}: the quantized model agrees with the float model on "
        f"{a:.2%} of {doc['holdout_samples']} held-out samples, below --min_agreement "
        f"{options.min_agreement:.2%} (relative error {doc['holdout']['rel_error']:.3g}); "
        "nothing written. Recover the pruned model first, try another scheme or "
        "--quantize_calibration, or lower --min_agreement")
  return doc


def _bytes(model) -> int:
  """Bytes of the serialised model: an ONNX ModelProto, a LiteRT flatbuffer, a
  TensorFlow GraphDef."""
  if hasattr(model, "proto"):
    return int(model.proto.ByteSize())
  if hasattr(model, "content"):
    return len(model.content)
  return int(model.graph_def.ByteSize())


def _measure(ref_fmt, reference, ref_graph, fmt, quantized, samples, options: Options) -> dict:
  x = samples.measuring()
  doc, = agreement_lib.against_first(
      [lambda: activations.runner(ref_fmt.adapter, reference, ()),
       lambda: activations.runner(fmt.adapter, quantized, ())],
      x, options.batch_size, activations.fixed_batch(ref_graph))
  return {"holdout_samples": int(len(x)), "holdout": doc, "min_agreement": options.min_agreement}
