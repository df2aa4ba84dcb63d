"""Builds small ONNX models node by node, with seeded random weights, for tests."""

import numpy as np
import onnx
from onnx import helper
from onnx import numpy_helper

_F = onnx.TensorProto.FLOAT


class Net:
  """Builds an NCHW float model node by node with random (seeded) weights."""

  def __init__(self, seed=0):
    self.nodes, self.inits = [], []
    self.rng = np.random.default_rng(seed)
    self.counts = {}

  def _name(self, prefix):
    self.counts[prefix] = self.counts.get(prefix, 0) + 1
    return f"{prefix}{self.counts[prefix]}"

  def weight(self, shape, scale=0.3, name=None, positive=False):
    name = name or self._name("w")
    value = self.rng.uniform(0.5, 1.5, shape) if positive else self.rng.standard_normal(shape)
    self.inits.append(numpy_helper.from_array((value * scale).astype(np.float32), name))
    return name

  def op(self, op_type, inputs, **attrs):
    out = self._name(op_type.lower())
    self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
    return out

  def conv(self, x, cin, cout, k=3, group=1, bias=True):
    """Conv node 'convK' with weight 'convK_w' and bias 'convK_b'."""
    name = f"conv{self.counts.get('conv', 0) + 1}"
    w = self.weight((cout, cin // group, k, k), name=name + "_w")
    ins = [x, w] + ([self.weight((cout,), name=name + "_b")] if bias else [])
    return self.op("Conv", ins, pads=[k // 2] * 4, group=group)

  def dense(self, x, shape, trans_b=0):
    """Gemm node 'gemmK' with weight 'gemmK_w' and bias 'gemmK_b'."""
    name = f"gemm{self.counts.get('gemm', 0) + 1}"
    w = self.weight(shape, name=name + "_w")
    b = self.weight((shape[0] if trans_b else shape[1],), name=name + "_b")
    return self.op("Gemm", [x, w, b], transB=trans_b)

  def bn(self, x, c):
    return self.op("BatchNormalization", [x, self.weight((c,), 1, positive=True),
                                          self.weight((c,)), self.weight((c,)),
                                          self.weight((c,), 1, positive=True)])

  def model(self, out, out_shape, opset=17, ir_version=None, channels=3, size=8,
            extra_inputs=(), domains=()):
    """The model with input x [N, channels, size, size] (size None: symbolic H, W),
    then `extra_inputs` (ValueInfoProtos), and output `out` of shape [N] + out_shape
    (out_shape None: shape left unstated)."""
    spatial = [size, size] if size is not None else ["H", "W"]
    out_info = (helper.make_tensor_value_info(out, _F, ["N"] + list(out_shape))
                if out_shape is not None else helper.make_tensor_value_info(out, _F, None))
    graph = helper.make_graph(
        self.nodes, "handmade",
        [helper.make_tensor_value_info("x", _F, ["N", channels] + spatial), *extra_inputs],
        [out_info], self.inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)] + [
                              helper.make_opsetid(d, 1) for d in domains],
                          producer_name="graph_prune-tests", doc_string="hand-made")
    if ir_version:
      m.ir_version = ir_version
    helper.set_model_props(m, {"owner": "tests"})
    onnx.checker.check_model(m)
    return m
