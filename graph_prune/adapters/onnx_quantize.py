"""Quantized ONNX models: int8 (ONNX Runtime's static QDQ quantizer), float16 (ONNX
Runtime's float16 converter) and codebook weights (indices and a codebook, rebuilt
into float weights by a few initializer-only nodes that ONNX Runtime folds once at
load). Each takes an ONNXModel and returns a new one; the input is not changed.
"""

from __future__ import annotations

import functools
import os
import platform
import shutil
import tempfile
from typing import Mapping, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from graph_prune import errors
from graph_prune.adapters import onnx_model

LINEAR_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_METHODS = {"minmax": "MinMax", "percentile": "Percentile", "entropy": "Entropy"}


def _save(model: onnx_model.ONNXModel, path: str) -> None:
  onnx.save_model(model.proto, path, save_as_external_data=model.external_data,
                  all_tensors_to_one_file=True, location=os.path.basename(path) + ".data")


@functools.cache  # the CPU does not change within a process
def weights_need_reduced_range() -> bool:
  """True on an x86 CPU without VNNI (AVX2, or AVX-512 without VNNI): ONNX Runtime
  then multiplies uint8 by int8 with VPMADDUBSW, whose int16 sums saturate, and its
  documentation asks for 7-bit weights (reduce_range) there. Measured: the built-in
  model at int8 agreed with the float model on 98.05 % of held-out samples on an
  AVX2 CPU with 8-bit weights, 99 % or more where VNNI is present."""
  if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
    return False
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      flags = f.read()
  except OSError:
    return True  # unknown x86: the safe choice
  return "vnni" not in flags


def int8(model: onnx_model.ONNXModel, batches: Sequence[np.ndarray], method: str,
         per_channel: bool) -> onnx_model.ONNXModel:
  """Static int8 quantization in QDQ form: weights int8 (symmetric; one scale per
  output channel with per_channel), activations uint8 with ranges from `batches`
  (fed to the model's one input) by `method` (minmax, percentile, entropy).

  ONNX Runtime's pre-processing (shape inference and graph optimisation) runs
  first, as its documentation asks; its symbolic shape inference is skipped (it
  needs sympy, and ONNX's own shape inference serves convolutional models)."""
  from onnxruntime import quantization as q  # pylint: disable=g-import-not-at-top

  class Reader(q.CalibrationDataReader):
    def __init__(self):
      self._it = iter(batches)

    def get_next(self):
      x = next(self._it, None)
      return None if x is None else {model.inputs[0]: x}

  tmp = tempfile.mkdtemp(prefix="gp_quantize_")
  try:
    src, pre, out = (os.path.join(tmp, n) for n in ("float.onnx", "pre.onnx", "int8.onnx"))
    _save(model, src)
    try:
      q.quant_pre_process(src, pre, skip_symbolic_shape=True,
                          save_as_external_data=model.external_data,
                          all_tensors_to_one_file=True)
      q.quantize_static(pre, out, Reader(), quant_format=q.QuantFormat.QDQ,
                        per_channel=per_channel,
                        calibrate_method=getattr(q.CalibrationMethod, _METHODS[method]),
                        activation_type=q.QuantType.QUInt8, weight_type=q.QuantType.QInt8,
                        reduce_range=weights_need_reduced_range(),
                        use_external_data_format=model.external_data)
    except Exception as e:  # pylint: disable=broad-except  (the quantizer raises many types)
      raise errors.RunError(f"ONNX Runtime's int8 quantizer failed on the model "
                            f"({errors.first_line(e)})") from None
    proto = onnx.load(out)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return onnx_model.ONNXModel(proto, model.inputs, model.outputs, model.external_data)


def float_linear_ops(model: onnx_model.ONNXModel) -> list[str]:
  """Op types of the linear layers whose weight is not read through a
  DequantizeLinear (what int8 quantization left in float)."""
  graph = model.proto.graph
  dequantized = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
  inits = {t.name for t in graph.initializer}
  return [n.op_type for n in graph.node if n.op_type in LINEAR_OPS and len(n.input) > 1 and
          n.input[1] in inits and n.input[1] not in dequantized]


def _toposort(graph: onnx.GraphProto) -> None:
  """Orders the nodes so each comes after the producers of its inputs (the float16
  converter appends its input casts at the end)."""
  ready = ({i.name for i in graph.input} | {t.name for t in graph.initializer} | {""})
  pending, ordered = list(graph.node), []
  while pending:
    rest = []
    for node in pending:
      # Subgraphs read outer-scope names; those come from the graph, so only the
      # node's own inputs decide its place.
      if all(i in ready for i in node.input):
        ordered.append(node)
        ready.update(node.output)
      else:
        rest.append(node)
    if len(rest) == len(pending):
      raise errors.RunError("the float16 model has a cycle or reads a tensor nothing makes "
                            f"(node '{rest[0].name}')")
    pending = rest
  copies = [onnx.NodeProto() for _ in ordered]
  for c, n in zip(copies, ordered):
    c.CopyFrom(n)
  del graph.node[:]
  graph.node.extend(copies)


def float16(model: onnx_model.ONNXModel) -> onnx_model.ONNXModel:
  """Weights and compute in float16, inputs and outputs kept float32."""
  from onnxruntime.transformers import float16 as converter  # pylint: disable=g-import-not-at-top
  proto = onnx.ModelProto()
  proto.CopyFrom(model.proto)
  try:
    converted = converter.convert_float_to_float16(proto, keep_io_types=True)
  except Exception as e:  # pylint: disable=broad-except
    raise errors.RunError(f"the float16 converter failed on the model ({errors.first_line(e)})"
                          ) from None
  _toposort(converted.graph)
  return onnx_model.ONNXModel(converted, model.inputs, model.outputs, model.external_data)


def packs4(model: onnx_model.ONNXModel) -> bool:
  """Whether 4-bit indices can be packed two to a byte (unpacking needs BitShift,
  opset 11)."""
  return onnx_model.opset_version(model.proto) >= 11


def codebook(model: onnx_model.ONNXModel, tables: Mapping[str, object]) -> onnx_model.ONNXModel:
  """Replaces each named weight initializer by its table (quantize.codebook.Table:
  codebook, indices, shape, bits, stored(packed)): uint8 indices (4-bit ones
  packed two to a byte where packs4) and a codebook, with nodes that
  rebuild the weight under its own name, so its readers are unchanged."""
  pack = packs4(model)
  # Short names (the file holds every name once per use): a prefix no tensor of
  # the model starts with, the layer's number after it, shared constants once.
  taken = {t for n in model.proto.graph.node for t in list(n.input) + list(n.output)} | {
      t.name for t in model.proto.graph.initializer}
  base = "gp_cb"
  while any(t.startswith(base) for t in taken):
    base += "_"
  mk = onnx.helper.make_node
  nodes, inits, shared = [], [], False
  four, flat, zero = f"{base}/four", f"{base}/flat", f"{base}/zero"
  for i, (name, t) in enumerate(tables.items()):
    p = f"{base}{i}"
    book = numpy_helper.from_array(np.asarray(t.codebook), f"{p}/codebook")
    if t.bits == 4 and pack:
      packed = t.stored(packed=True)
      if not shared:
        inits += [numpy_helper.from_array(np.array([4], np.uint8), four),
                  numpy_helper.from_array(np.array([-1], np.int64), flat),
                  numpy_helper.from_array(np.array([0], np.int64), zero)]
        shared = True
      inits += [numpy_helper.from_array(packed, f"{p}/packed"),
                numpy_helper.from_array(np.array([len(packed), 1], np.int64), f"{p}/column"),
                numpy_helper.from_array(np.array([t.indices.size], np.int64), f"{p}/count"),
                numpy_helper.from_array(np.array(t.shape, np.int64), f"{p}/shape")]
      nodes += [
          mk("BitShift", [f"{p}/packed", four], [f"{p}/high"], direction="RIGHT"),
          mk("BitShift", [f"{p}/high", four], [f"{p}/high_up"], direction="LEFT"),
          mk("Sub", [f"{p}/packed", f"{p}/high_up"], [f"{p}/low"]),
          mk("Reshape", [f"{p}/low", f"{p}/column"], [f"{p}/low_col"]),
          mk("Reshape", [f"{p}/high", f"{p}/column"], [f"{p}/high_col"]),
          mk("Concat", [f"{p}/low_col", f"{p}/high_col"], [f"{p}/pairs"], axis=1),
          mk("Reshape", [f"{p}/pairs", flat], [f"{p}/all"]),
          mk("Slice", [f"{p}/all", zero, f"{p}/count"], [f"{p}/flat_indices"]),
          mk("Reshape", [f"{p}/flat_indices", f"{p}/shape"], [f"{p}/indices"])]
    else:
      inits.append(numpy_helper.from_array(t.stored(packed=False), f"{p}/indices"))
    nodes += [mk("Cast", [f"{p}/indices"], [f"{p}/indices_int"], to=onnx.TensorProto.INT32),
              mk("Gather", [f"{p}/codebook", f"{p}/indices_int"], [name], axis=0)]
    inits.append(book)
  proto = onnx.ModelProto()
  proto.CopyFrom(model.proto)
  graph = proto.graph
  kept = [t for t in graph.initializer if t.name not in tables]
  del graph.initializer[:]
  graph.initializer.extend(kept + inits)
  old = list(graph.node)
  del graph.node[:]
  graph.node.extend(nodes + old)
  return onnx_model.ONNXModel(proto, model.inputs, model.outputs, model.external_data)
