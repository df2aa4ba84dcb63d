"""Pruning already-quantized (QDQ int8) ONNX models.

The models come from ONNX Runtime's own quantizer (quantize_static, QDQ format,
int8 weights per channel and per tensor). A weight's DequantizeLinear of
constant codes is a constant to the analysis; the rewrite cuts the int8 codes
with their per-channel scales and zero points, so the output stays int8, and the
oracle runs in ONNX Runtime.
"""

import os

import numpy as np
import onnx
import onnxruntime
from absl.testing import absltest
from absl.testing import parameterized
from onnx import numpy_helper
from onnxruntime import quantization

from graph_prune import errors
from graph_prune import pipeline
from graph_prune.calibration import samples as samples_lib
from graph_prune.quantize import options as quantize_options
from graph_prune.reconstruct import reconstruct
from tests import keras_zoo
from tests import onnx_net

_SIZE = 16


def _net(dead=()):
  """Residual CNN with a concat and a dense head; `dead` output channels of conv4
  (its own group: it feeds the concat, no batch norm) have zero weights and bias,
  so they are exactly 0 after the ReLU."""
  n = onnx_net.Net(seed=3)
  h1 = n.op("Relu", [n.conv("x", 3, 16)])
  h2 = n.op("Relu", [n.bn(n.conv(h1, 16, 16), 16)])
  h3 = n.bn(n.conv(h2, 16, 16), 16)
  r = n.op("Relu", [n.op("Add", [h1, h3])])
  c4 = n.op("Relu", [n.conv(r, 16, 8)])
  for t in n.inits:
    if t.name in ("conv4_w", "conv4_b"):
      value = numpy_helper.to_array(t).copy()
      value[list(dead)] = 0
      t.CopyFrom(numpy_helper.from_array(value, t.name))
  c = n.op("Concat", [r, c4], axis=1)
  g = n.op("Flatten", [n.op("GlobalAveragePool", [n.op("Relu", [n.conv(c, 24, 32)])])])
  return n.model(n.dense(g, (32, 10)), [10], opset=17, size=_SIZE)


class _Reader(quantization.CalibrationDataReader):

  def __init__(self, name, shape, count=16):
    rng = np.random.default_rng(0)
    self._it = iter([{name: rng.standard_normal(shape).astype(np.float32)}
                     for _ in range(count)])

  def get_next(self):
    return next(self._it, None)


def _quantize(src, dst, per_channel, name="x", shape=(1, 3, _SIZE, _SIZE)):
  quantization.quantize_static(src, dst, _Reader(name, shape),
                               quant_format=quantization.QuantFormat.QDQ,
                               per_channel=per_channel,
                               weight_type=quantization.QuantType.QInt8,
                               activation_type=quantization.QuantType.QUInt8)
  return dst


def _run(path, x, name="x"):
  """Outputs in ONNX Runtime at full optimisation (QDQ fused into int8 kernels)."""
  return onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"]).run(
      None, {name: x})[0]


def _int8_weights(proto):
  """Codes of every dequantized initializer, by the DequantizeLinear's output."""
  inits = {t.name: t for t in proto.graph.initializer}
  return {n.output[0]: numpy_helper.to_array(inits[n.input[0]]) for n in proto.graph.node
          if n.op_type == "DequantizeLinear" and n.input[0] in inits}


class QdqTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.tmp = self.create_tempdir().full_path

  def _float_and_quantized(self, per_channel, dead=()):
    src = os.path.join(self.tmp, "float.onnx")
    onnx.save_model(_net(dead), src)
    return src, _quantize(src, os.path.join(self.tmp, "int8.onnx"), per_channel)

  @parameterized.named_parameters(("per_channel", True), ("per_tensor", False))
  def test_prunes_int8_codes_and_stays_int8(self, per_channel):
    _, src = self._float_and_quantized(per_channel)
    out = os.path.join(self.tmp, "pruned.onnx")
    doc = pipeline.prune(src, out, pipeline.Options(ratio=0.5))
    self.assertTrue(doc["verify"]["passed"], doc["verify"])
    self.assertEqual(doc["verify"]["max_rel_diff"], 0.0)
    self.assertEqual(doc["groups_pruned"], 4)
    before, after = onnx.load(src), onnx.load(out)
    codes_before, codes_after = _int8_weights(before), _int8_weights(after)
    # Every quantized weight is still int8 codes behind its DequantizeLinear (no float
    # weight came back), and the convolutions lost channels.
    self.assertEqual(set(codes_after), set(codes_before))
    for name, codes in codes_after.items():
      self.assertEqual(codes.dtype, codes_before[name].dtype, name)
    conv_codes = [c for c in codes_after.values() if c.ndim == 4]
    self.assertLess(sum(c.size for c in conv_codes),
                    0.5 * sum(c.size for c in codes_before.values() if c.ndim == 4))
    float_inits = [t for t in after.graph.initializer
                   if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) > 1]
    self.assertEqual(float_inits, [])
    # Per-channel scales and zero points were cut with their codes.
    inits = {t.name: numpy_helper.to_array(t) for t in after.graph.initializer}
    for n in after.graph.node:
      if n.op_type == "DequantizeLinear" and n.input[0] in inits:
        scale = inits[n.input[1]]
        if scale.size > 1:
          axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
          self.assertEqual(scale.shape[0], inits[n.input[0]].shape[axis], n.name)
          if len(n.input) > 2 and n.input[2]:
            self.assertEqual(inits[n.input[2]].shape, scale.shape, n.name)
    self.assertLess(os.path.getsize(out), 0.7 * os.path.getsize(src))
    onnx.checker.check_model(after, full_check=True)
    x = np.random.default_rng(1).standard_normal((4, 3, _SIZE, _SIZE)).astype(np.float32)
    self.assertEqual(_run(out, x).shape, (4, 10))

  def test_dead_channels_removed_exactly_at_full_optimisation(self):
    # conv4's channels 1, 4 (zero codes and bias) are removed and nothing else: the
    # pruned int8 model gives the original's outputs bit for bit where ONNX Runtime
    # fuses the QDQ pairs into int8 convolutions.
    _, src = self._float_and_quantized(True, dead=(1, 4))
    out = os.path.join(self.tmp, "pruned.onnx")
    doc = pipeline.prune(src, out, pipeline.Options(ratio=0.0, criterion="l1",
                                                    overrides=(("conv4", 2 / 8),)))
    changed = [g for g in doc["groups"] if g["channels_after"] < g["channels_before"]]
    self.assertLen(changed, 1)
    self.assertEqual((changed[0]["channels_before"], changed[0]["channels_after"]), (8, 6))
    x = np.random.default_rng(2).standard_normal((8, 3, _SIZE, _SIZE)).astype(np.float32)
    np.testing.assert_array_equal(_run(out, x), _run(src, x))

  def test_shared_weight_cut_two_ways_gets_its_own_dequantizer(self):
    # One int8 weight (one DequantizeLinear) read by two convolutions whose inputs
    # and outputs are pruned differently: the second cut is a copy of the codes,
    # scales and zero points behind a dequantizer of its own.
    n = onnx_net.Net(seed=5)
    a = n.op("Relu", [n.conv("x", 3, 8)])
    b = n.op("Relu", [n.conv("x", 3, 8)])
    w = n.weight((8, 8, 3, 3), name="shared_w")
    ya = n.op("Relu", [n.op("Conv", [a, w], pads=[1] * 4)])
    yb = n.op("Relu", [n.op("Conv", [b, w], pads=[1] * 4)])
    g = n.op("Flatten", [n.op("GlobalAveragePool", [n.op("Concat", [ya, yb], axis=1)])])
    src = os.path.join(self.tmp, "float.onnx")
    onnx.save_model(n.model(n.dense(g, (16, 4)), [4], size=_SIZE), src)
    qsrc = _quantize(src, os.path.join(self.tmp, "int8.onnx"), True)
    dq_before = [d for d in onnx.load(qsrc).graph.node if d.op_type == "DequantizeLinear"
                 and d.input[0].startswith("shared_w")]
    self.assertLen(dq_before, 1)
    out = os.path.join(self.tmp, "pruned.onnx")
    doc = pipeline.prune(qsrc, out, pipeline.Options(ratio=0.5))
    self.assertTrue(doc["verify"]["passed"], doc["verify"])
    self.assertEqual(doc["verify"]["max_rel_diff"], 0.0)
    after = onnx.load(out)
    inits = {t.name: t for t in after.graph.initializer}
    dq_after = [d for d in after.graph.node if d.op_type == "DequantizeLinear"
                and d.input[0].startswith(("shared_w", dq_before[0].output[0]))]
    self.assertLen(dq_after, 2)
    for d in dq_after:
      self.assertEqual(inits[d.input[0]].data_type, onnx.TensorProto.INT8)
      self.assertEqual(list(inits[d.input[0]].dims), [4, 4, 3, 3])
    x = np.random.default_rng(4).standard_normal((2, 3, _SIZE, _SIZE)).astype(np.float32)
    self.assertEqual(_run(out, x).shape, (2, 4))

  def test_real_architecture_from_tf2onnx(self):
    # MobileNetV2 (depthwise convolutions, residual adds), converted by tf2onnx and
    # quantized per channel by ONNX Runtime.
    fixture = keras_zoo.Fixture("MobileNetV2", self.tmp)
    src = os.path.join(self.tmp, "mnv2.onnx")
    _tf2onnx(fixture.graph_def(), src)
    size = keras_zoo.input_size("MobileNetV2")
    qsrc = _quantize(src, os.path.join(self.tmp, "mnv2_int8.onnx"), True, "input:0",
                     (1, size, size, 3))
    out = os.path.join(self.tmp, "mnv2_pruned.onnx")
    doc = pipeline.prune(qsrc, out, pipeline.Options(ratio=0.5))
    self.assertTrue(doc["verify"]["passed"], doc["verify"])
    self.assertLessEqual(doc["verify"]["max_rel_diff"], 1e-5)
    self.assertGreater(doc["groups_pruned"], 10)
    self.assertLess(doc["params_after"], 0.5 * doc["params_before"])
    self.assertLess(os.path.getsize(out), 0.6 * os.path.getsize(qsrc))
    before = _int8_weights(onnx.load(qsrc))
    after = _int8_weights(onnx.load(out))
    self.assertEqual(set(after), set(before))
    y = _run(out, keras_zoo.sample_input("MobileNetV2", batch=2), "input:0")
    self.assertEqual(y.shape, (2, keras_zoo.NUM_CLASSES))

  @parameterized.named_parameters(
      ("reconstruct", {"reconstruct": reconstruct.Options(method="lsq")}, "--reconstruct"),
      ("quantize", {"quantize": quantize_options.Options("int8")}, "--quantize"))
  def test_refused_on_a_quantized_input(self, kw, flag):
    _, src = self._float_and_quantized(True)
    data = os.path.join(self.tmp, "cal.npz")
    np.savez(data, x=np.random.default_rng(3).standard_normal(
        (64, 3, _SIZE, _SIZE)).astype(np.float32))
    out = os.path.join(self.tmp, "pruned.onnx")
    with self.assertRaisesRegex(errors.UsageError, f"{flag}: the input is already quantized"):
      pipeline.prune(src, out, pipeline.Options(
          ratio=0.5, calibration=samples_lib.Spec(data, samples=48, holdout=16), **kw))
    self.assertFalse(os.path.exists(out))


def _tf2onnx(graph_def, path):
  import tf2onnx  # pylint: disable=g-import-not-at-top
  tf2onnx.convert.from_graph_def(graph_def, input_names=["input:0"],
                                 output_names=["Identity:0"], opset=17, output_path=path)


if __name__ == "__main__":
  absltest.main()
