"""Builds small ONNX models node by node, with seeded random weights, for tests."""

import os

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

  def conv(self, x, cin, cout, k=3, group=1, bias=True, stride=1):
    """Conv node 'convK' with weight 'convK_w' and bias 'convK_b'."""
    name = f"conv{self.counts.get('conv', 0) + 1}"
    w = self.weight((cout, cin // group, k, k), name=name + "_w")
    ins = [x, w] + ([self.weight((cout,), name=name + "_b")] if bias else [])
    extra = {"strides": [stride, stride]} if stride != 1 else {}
    return self.op("Conv", ins, pads=[k // 2] * 4, group=group, **extra)

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


_PATH = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light",
                     "light_shufflenet.onnx")


def _value(name, shape, rng):
  if "_bn_s" in name or "_bn_riv" in name:        # batch-norm scale, variance: positive
    return rng.uniform(0.5, 1.5, shape)
  if "_bn_" in name or name.endswith("_b_0"):      # batch-norm shift, mean; biases
    return rng.normal(0.0, 0.2, shape)
  fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
  return rng.normal(0.0, np.sqrt(2.0 / fan_in), shape)


def filled_shufflenet(seed=0) -> onnx.ModelProto:
  """light_shufflenet.onnx with every weight a seeded random initializer."""
  m = onnx.load(_PATH, load_external_data=False)
  rng = np.random.default_rng(seed)
  inits = {t.name: t for t in m.graph.initializer}
  nodes, weights = [], []
  for n in m.graph.node:
    if n.op_type == "ConstantOfShape":
      shape = numpy_helper.to_array(inits[n.input[0]])
      weights.append(numpy_helper.from_array(
          _value(n.output[0], shape, rng).astype(np.float32), n.output[0]))
    else:
      nodes.append(n)
  read = {t for n in nodes for t in n.input}
  kept = []
  for t in m.graph.initializer:
    if t.name not in read:
      continue
    value = numpy_helper.to_array(t)
    if value.dtype == np.float32:
      t = numpy_helper.from_array(_value(t.name, value.shape, rng).astype(np.float32), t.name)
    kept.append(t)
  del m.graph.node[:]
  m.graph.node.extend(nodes)
  del m.graph.initializer[:]
  m.graph.initializer.extend(kept + weights)
  names = {t.name for t in m.graph.initializer}
  data = [i for i in m.graph.input if i.name not in inits]
  inputs = data + [i for i in m.graph.input if i.name in names]   # IR 3: initializers are inputs
  inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in weights]
  del m.graph.input[:]
  m.graph.input.extend(inputs)
  onnx.checker.check_model(m)
  return m


def filled_external(path: str, seed=0) -> onnx.ModelProto:
  """The ONNX model at `path` whose weights were left out (external data that is
  not there), with every such weight filled with seeded random values: filters
  scaled by their fan-in, biases and other vectors around zero."""
  m = onnx.load(path, load_external_data=False)
  rng = np.random.default_rng(seed)
  for t in m.graph.initializer:
    if t.data_location != onnx.TensorProto.EXTERNAL:
      continue
    shape = tuple(t.dims)
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    value = (rng.normal(0.0, np.sqrt(2.0 / fan_in), shape) if len(shape) > 1
             else rng.normal(0.0, 0.2, shape))
    t.CopyFrom(numpy_helper.from_array(value.astype(np.float32), t.name))
  onnx.checker.check_model(m)
  return m
