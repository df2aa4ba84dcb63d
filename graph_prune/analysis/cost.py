"""Size and arithmetic cost of a graph view: parameters, constant bytes, FLOPs.

FLOPs count multiply-adds of convolutions and dense layers as two operations,
for one sample (an unknown batch size is taken as 1).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from graph_prune.graph import view


@dataclasses.dataclass(frozen=True)
class Cost:
  params: int        # elements of floating-point constants with at least one axis
  const_bytes: int   # bytes of all constants
  flops: int


def _per_sample(shape) -> int:
  if shape is None or any(s is None for s in shape[1:]):
    return 0
  return math.prod(shape[1:])


def _conv(g: view.GraphView, node: view.Node) -> int:
  w = g.constants.get(node.inputs[1])
  if w is None:
    return 0
  kh, kw, cin, _ = w.shape
  return 2 * _per_sample(g.shape(node.outputs[0])) * kh * kw * cin


def _depthwise(g: view.GraphView, node: view.Node) -> int:
  w = g.constants.get(node.inputs[1])
  if w is None:
    return 0
  return 2 * _per_sample(g.shape(node.outputs[0])) * w.shape[0] * w.shape[1]


def _matmul(g: view.GraphView, node: view.Node) -> int:
  w = g.constants.get(node.inputs[1])
  if w is None:
    return 0
  return 2 * int(w.size) * max(1, _per_sample(g.shape(node.outputs[0])) // max(1, (
      w.shape[0] if node.attrs.get("transpose_b") else w.shape[1])))


def _onnx_conv(g: view.GraphView, node: view.Node) -> int:
  w = g.constants.get(node.inputs[1])
  if w is None:
    return 0
  return 2 * _per_sample(g.shape(node.outputs[0])) * int(np.prod(w.shape[1:]))


def _onnx_dense(g: view.GraphView, node: view.Node) -> int:
  w = g.constants.get(node.inputs[1])
  if w is None or w.ndim != 2:
    return 0
  out = _per_sample(g.shape(node.outputs[0]))
  units = w.shape[0] if node.attrs.get("transB") else w.shape[1]
  return 2 * int(w.size) * max(1, out // max(1, units))


def _onnx_conv_transpose(g: view.GraphView, node: view.Node) -> int:
  w = g.constants.get(node.inputs[1])
  if w is None:
    return 0
  return 2 * _per_sample(g.shape(node.inputs[0])) * int(np.prod(w.shape[1:]))


_FLOPS = {"Conv2D": _conv, "DepthwiseConv2dNative": _depthwise, "MatMul": _matmul,
          # ONNX op types (capitalised differently from TensorFlow's).
          "Conv": _onnx_conv, "ConvTranspose": _onnx_conv_transpose, "Gemm": _onnx_dense}


def _flops(g: view.GraphView, node: view.Node) -> int:
  fn = _FLOPS.get(node.op)
  return fn(g, node) if fn else 0


def measure(g: view.GraphView) -> Cost:
  params = sum(int(c.size) for c in g.constants.values()
               if c.ndim >= 1 and np.issubdtype(c.dtype, np.floating))
  const_bytes = sum(int(c.nbytes) for c in g.constants.values())
  flops = sum(_flops(g, n) for n in g.nodes)
  return Cost(params, const_bytes, flops)
