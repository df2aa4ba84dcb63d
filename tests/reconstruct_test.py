"""Reconstruction and calibrated criteria: the least-squares core, the im2col
geometry against ONNX Runtime and TensorFlow, and whole runs on ONNX models with
planted structure (exact recovery of a linear map, exact bias folding of
constant channels, calibrated criteria finding planted channels)."""

import os

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np
import onnx
from onnx import helper
from onnx import numpy_helper
import onnxruntime

from graph_prune import errors
from graph_prune import pipeline
from graph_prune.calibration import samples as samples_lib
from graph_prune.graph import view
from graph_prune.ops import desc
from graph_prune.ops import geometry
from graph_prune.reconstruct import normal
from graph_prune.reconstruct import reconstruct as reconstruct_lib
from tests import onnx_net

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import tensorflow as tf  # pylint: disable=g-import-not-at-top,g-bad-import-order


class NormalTest(absltest.TestCase):

  def test_batches_equal_one_solve(self):
    rng = np.random.default_rng(0)
    p = rng.standard_normal((900, 3, 7)).astype(np.float32)
    y = rng.standard_normal((900, 3, 4)).astype(np.float32)
    prior = rng.standard_normal((3, 7, 4))
    one = normal.Normal(3, 7, 4, intercept=True)
    one.add(p, y)
    chunked = normal.Normal(3, 7, 4, intercept=True)
    for i in range(0, 900, 128):
      chunked.add(p[i:i + 128], y[i:i + 128])
    a, b = one.solve(prior, 1e-3), chunked.solve(prior, 1e-3)
    np.testing.assert_allclose(a.weight, b.weight, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(a.intercept, b.intercept, rtol=1e-9, atol=1e-12)
    self.assertEqual(b.rows, 900)

  def test_recovers_a_known_linear_map(self):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((1, 12, 5))
    c = rng.standard_normal((1, 5))
    p = rng.standard_normal((400, 1, 12)).astype(np.float32)
    y = (np.einsum("rgf,gfo->rgo", p, w) + c).astype(np.float32)
    eq = normal.Normal(1, 12, 5, intercept=True)
    for i in range(0, 400, 100):
      eq.add(p[i:i + 100], y[i:i + 100])
    fit = eq.solve(np.zeros_like(w), 0.0)
    np.testing.assert_allclose(fit.weight, w, atol=1e-5)
    np.testing.assert_allclose(fit.intercept, c, atol=1e-5)
    # The errors come from sums of squares (float32 products): accurate to ~1e-3.
    self.assertLess(fit.rel_error_after, 1e-3)
    self.assertGreater(fit.rel_error_before, 0.5)

  def test_ridge_pulls_towards_the_slice(self):
    rng = np.random.default_rng(2)
    prior = rng.standard_normal((1, 20, 3))
    eq = normal.Normal(1, 20, 3, intercept=False)
    eq.add(rng.standard_normal((5, 1, 20)), rng.standard_normal((5, 1, 3)))  # 5 rows, 20 unknowns
    weak, strong = eq.solve(prior, 1e-6), eq.solve(prior, 1e3)
    self.assertLess(np.abs(strong.weight - prior).max(), 1e-2)
    self.assertGreater(np.abs(weak.weight - prior).max(), 0.1)


def _onnx_conv(x, w, attrs):
  node = helper.make_node("Conv", ["x", "w"], ["z"], **attrs)
  graph = helper.make_graph(
      [node], "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, x.shape)],
      [helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, None)],
      [numpy_helper.from_array(w, "w")])
  model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
  return onnxruntime.InferenceSession(model.SerializeToString(),
                                      providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


class GeometryTest(parameterized.TestCase):
  """rows x matrix must reproduce the runtime's convolution exactly (float32)."""

  def _check(self, x, w, z, lin):
    layer = geometry.Layer(lin, w.shape)
    p = geometry.rows(x, layer)
    got = np.einsum("rgf,gfo->rgo", p, geometry.matrix(w, layer))
    want = geometry.outputs(z, layer)
    self.assertEqual(got.shape, want.shape)
    self.assertLess(np.abs(got - want).max() / np.abs(want).max(), 1e-5)
    np.testing.assert_array_equal(geometry.weight(geometry.matrix(w, layer), layer, w.dtype), w)
    picks = np.array([0, 3, len(p) - 1])
    np.testing.assert_array_equal(geometry.rows(x, layer, picks), p[picks])
    self.assertEqual(geometry.output_positions(layer, x.shape),
                     tuple(z.shape[2:]) if lin.channel_axis == 1 else tuple(z.shape[1:-1]))

  @parameterized.named_parameters(
      ("pads", {"pads": [1, 0, 2, 1], "strides": [2, 1]}, (4, 6, 3, 3)),
      ("same_lower", {"auto_pad": "SAME_LOWER", "strides": [2, 2]}, (4, 6, 2, 2)),
      ("same_upper", {"auto_pad": "SAME_UPPER", "strides": [2, 2]}, (4, 6, 2, 2)),
      ("valid", {"auto_pad": "VALID", "dilations": [2, 2]}, (4, 6, 3, 3)),
      ("grouped", {"group": 3, "pads": [1, 1, 1, 1]}, (6, 2, 3, 3)),
      ("depthwise", {"group": 6, "pads": [1, 1, 1, 1], "dilations": [2, 1]}, (12, 1, 3, 3)))
  def test_onnx_conv(self, attrs, wshape):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 6, 9, 8)).astype(np.float32)
    w = rng.standard_normal(wshape).astype(np.float32)
    node = view.Node("c", "Conv", ("x", "w"), ("z",), attrs)
    g = attrs.get("group", 1)
    lin = desc.spatial_linear(node, w, 0, 1, True, w.shape[1], groups=g,
                              multiplier=w.shape[0] // g if w.shape[1] == 1 else 1)
    self._check(x, w, _onnx_conv(x, w, attrs), lin)

  def test_onnx_conv_1d_and_3d(self):
    rng = np.random.default_rng(1)
    for xs, ws, attrs in (((2, 4, 11), (3, 4, 3), {"pads": [1, 1], "strides": [2]}),
                          ((2, 4, 5, 6, 7), (3, 4, 3, 2, 3), {"pads": [1, 0, 1, 1, 1, 1]})):
      x = rng.standard_normal(xs).astype(np.float32)
      w = rng.standard_normal(ws).astype(np.float32)
      lin = desc.spatial_linear(view.Node("c", "Conv", ("x", "w"), ("z",), attrs), w, 0, 1,
                                True, 4)
      self._check(x, w, _onnx_conv(x, w, attrs), lin)

  @parameterized.named_parameters(("same", "SAME", 1, 1), ("same_stride", "SAME", 2, 1),
                                  ("valid_stride", "VALID", 2, 1), ("dilated", "SAME", 1, 2))
  def test_tf_conv(self, padding, stride, dilation):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 9, 10, 6)).astype(np.float32)
    w = rng.standard_normal((3, 3, 6, 5)).astype(np.float32)
    z = tf.nn.conv2d(x, w, stride, padding, dilations=dilation).numpy()
    node = view.Node("c", "Conv2D", ("x", "w"), ("z",), {
        "padding": padding, "strides": (1, stride, stride, 1),
        "dilations": (1, dilation, dilation, 1), "data_format": "NHWC"})
    self._check(x, w, z, desc.spatial_linear(node, w, -1, -2, False, 6))

  def test_tf_explicit_padding_and_depthwise(self):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 8, 8, 6)).astype(np.float32)
    w = rng.standard_normal((3, 3, 6, 4)).astype(np.float32)
    z = tf.nn.conv2d(x, w, 1, [[0, 0], [1, 2], [0, 1], [0, 0]]).numpy()
    node = view.Node("c", "Conv2D", ("x", "w"), ("z",), {
        "padding": "EXPLICIT", "explicit_paddings": (0, 0, 1, 2, 0, 1, 0, 0),
        "strides": (1, 1, 1, 1)})
    self._check(x, w, z, desc.spatial_linear(node, w, -1, -2, False, 6))
    w = rng.standard_normal((3, 3, 6, 2)).astype(np.float32)
    z = tf.nn.depthwise_conv2d(x, w, [1, 2, 2, 1], "SAME").numpy()
    node = view.Node("c", "DepthwiseConv2dNative", ("x", "w"), ("z",),
                     {"padding": "SAME", "strides": (1, 2, 2, 1)})
    self._check(x, w, z, desc.spatial_linear(node, w, 2, 3, False, 1, groups=6, multiplier=2,
                                             multiplier_axis=3))


def _write_npz(directory, x, name="calib.npz"):
  path = os.path.join(directory, name)
  np.savez(path, x=x)
  return path


def _run(model, tmp, x, **options):
  """Prunes `model` with calibration samples x (NHWC); returns the report."""
  src = os.path.join(tmp, "in.onnx")
  onnx.save(model, src)
  calibration = samples_lib.Spec(_write_npz(tmp, x), samples=len(x) - len(x) // 5,
                                 holdout=len(x) // 5)
  return pipeline.prune(src, os.path.join(tmp, "out.onnx"),
                        pipeline.Options(overwrite=True, calibration=calibration, **options))


def _linear_map_model(seed=0):
  """conv1 (8 filters, no activation after it) -> conv2 3x3 -> output. Filters 5..7
  of conv1 (weights and bias) are small linear combinations of filters 0..2, so
  after l1 removes them conv2 can reproduce its original output exactly from the
  rest (also at the borders, where it reads conv1's zero padding)."""
  net = onnx_net.Net(seed)
  h = net.conv("x", 3, 8)
  inits = {i.name: i for i in net.inits}
  w = numpy_helper.to_array(inits["conv1_w"]).copy()
  b = numpy_helper.to_array(inits["conv1_b"]).copy()
  w[:5] *= 10
  for i, mix in ((5, (0.05, 0.02, 0)), (6, (0, 0, -0.03)), (7, (-0.01, 0.04, 0))):
    w[i] = sum(m * w[j] for j, m in enumerate(mix))
    b[i] = sum(m * b[j] for j, m in enumerate(mix))
  inits["conv1_w"].CopyFrom(numpy_helper.from_array(w, "conv1_w"))
  inits["conv1_b"].CopyFrom(numpy_helper.from_array(b, "conv1_b"))
  out = net.conv(h, 8, 4)
  return net.model(out, [4, 8, 8])


def _constant_channels_model(seed=0):
  """conv1 3x3 (8) -> ReLU -> conv2 1x1 (6) -> ReLU -> GlobalAveragePool -> Flatten
  -> Gemm (5). conv1's filters 2 and 6 and conv2's filter 1 have zero weights and
  a positive bias: after the ReLU their channels are non-zero constants."""
  net = onnx_net.Net(seed)
  h = net.op("Relu", [net.conv("x", 3, 8)])
  h = net.op("Relu", [net.conv(h, 8, 6, k=1)])
  h = net.op("Flatten", [net.op("GlobalAveragePool", [h])])
  out = net.dense(h, (6, 5))
  inits = {i.name: i for i in net.inits}
  for conv, dead in (("conv1", [2, 6]), ("conv2", [1])):
    w = numpy_helper.to_array(inits[f"{conv}_w"]).copy() * 3
    b = numpy_helper.to_array(inits[f"{conv}_b"]).copy()
    w[dead] = 0.0
    b[dead] = [0.7, 1.3][:len(dead)]
    inits[f"{conv}_w"].CopyFrom(numpy_helper.from_array(w, f"{conv}_w"))
    inits[f"{conv}_b"].CopyFrom(numpy_helper.from_array(b, f"{conv}_b"))
  return net.model(out, [5])


class OnnxReconstructionTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.tmp = self.create_tempdir().full_path
    self.x = np.random.default_rng(5).standard_normal((300, 8, 8, 3)).astype(np.float32)

  def test_lsq_recovers_an_exact_linear_map(self):
    doc = _run(_linear_map_model(), self.tmp, self.x, ratio=3 / 8,
               reconstruct=reconstruct_lib.Options("lsq", ridge=1e-9))
    r = doc["reconstruction"]
    self.assertEqual([l["node"] for l in r["layers"]], ["conv2"])
    self.assertGreater(r["holdout_before"]["rel_error"], 1e-2)   # the slice alone is off
    self.assertLess(r["holdout_after"]["max_rel_diff"], 1e-4)    # the fit is exact
    self.assertEqual(r["layers"][0]["intercept_into"], "conv2_b")
    self.assertTrue(doc["verify"]["passed"])

  def test_bias_makes_constant_channels_exact(self):
    model = _constant_channels_model()
    plain = _run(model, self.tmp, self.x, ratio=0.25,
                 reconstruct=reconstruct_lib.Options("bias"))
    r = plain["reconstruction"]
    self.assertEqual(sorted(l["node"] for l in r["layers"]), ["conv2", "gemm1"])
    self.assertGreater(r["holdout_before"]["max_rel_diff"], 1e-2)   # dropping them is not exact
    self.assertLess(r["holdout_after"]["max_rel_diff"], 1e-5)       # folding them is
    kept = {g["sources"][0]: g["channels_after"] for g in plain["groups"]}
    self.assertEqual(kept, {"conv1": 6, "conv2": 5})

  def test_lsq_also_makes_constant_channels_exact(self):
    doc = _run(_constant_channels_model(), self.tmp, self.x, ratio=0.25,
               reconstruct=reconstruct_lib.Options("lsq", ridge=1e-9))
    self.assertLess(doc["reconstruction"]["holdout_after"]["max_rel_diff"], 1e-4)

  def test_written_model_is_the_reconstructed_one(self):
    doc = _run(_constant_channels_model(), self.tmp, self.x, ratio=0.25,
               reconstruct=reconstruct_lib.Options("bias"))
    del doc
    original = onnxruntime.InferenceSession(os.path.join(self.tmp, "in.onnx"),
                                            providers=["CPUExecutionProvider"])
    pruned = onnxruntime.InferenceSession(os.path.join(self.tmp, "out.onnx"),
                                          providers=["CPUExecutionProvider"])
    x = np.random.default_rng(9).standard_normal((4, 3, 8, 8)).astype(np.float32)
    a, b = original.run(None, {"x": x})[0], pruned.run(None, {"x": x})[0]
    self.assertLess(np.abs(a - b).max() / np.abs(a).max(), 1e-5)

  def test_needs_calibration_data(self):
    src = os.path.join(self.tmp, "in.onnx")
    onnx.save(_constant_channels_model(), src)
    with self.assertRaisesRegex(errors.UsageError, "--calibration_data"):
      pipeline.prune(src, os.path.join(self.tmp, "o.onnx"),
                     pipeline.Options(reconstruct=reconstruct_lib.Options("lsq")))
    with self.assertRaisesRegex(errors.UsageError, "--calibration_data"):
      pipeline.prune(src, os.path.join(self.tmp, "o.onnx"), pipeline.Options(criterion="apoz"))
    self.assertFalse(os.path.exists(os.path.join(self.tmp, "o.onnx")))

  def test_too_few_samples_says_how_many(self):
    # The Gemm keeps 5 inputs + an intercept: 6 rows needed, 4 samples give 4.
    with self.assertRaisesRegex(errors.InputError, r"at least 6 rows.*give at least 6 samples"):
      _run(_constant_channels_model(), self.tmp, self.x[:5], ratio=0.25,
           reconstruct=reconstruct_lib.Options("lsq"))
    self.assertFalse(os.path.exists(os.path.join(self.tmp, "out.onnx")))


def _criteria_model(seed=0):
  """conv1 (8 filters) -> ReLU -> conv2 -> output, on 3 input channels.
  Filters 0, 1: large weights on input channels 0 and 1, bias -100: always zero
  after the ReLU (activation and apoz must remove them). Filters 2, 3: large
  weights on input channel 2 only, which the calibration data leaves at zero,
  bias +5 (wanda must remove them; activation and apoz must not). Filters 4..7
  are small: l1 removes those."""
  net = onnx_net.Net(seed)
  h = net.op("Relu", [net.conv("x", 3, 8)])
  out = net.conv(h, 8, 4)
  inits = {i.name: i for i in net.inits}
  w = numpy_helper.to_array(inits["conv1_w"]).copy()
  b = numpy_helper.to_array(inits["conv1_b"]).copy()
  w[:4] *= 20
  w[0:2, 2] = 0.0
  w[2:4, :2] = 0.0
  b[:2], b[2:4] = -100.0, 5.0
  inits["conv1_w"].CopyFrom(numpy_helper.from_array(w, "conv1_w"))
  inits["conv1_b"].CopyFrom(numpy_helper.from_array(b, "conv1_b"))
  return net.model(out, [4, 8, 8])


class CalibratedCriteriaTest(parameterized.TestCase):

  @parameterized.parameters(("activation", [0, 1]), ("apoz", [0, 1]), ("wanda", [2, 3]),
                            ("l1", None))
  def test_planted_channels_go_first(self, criterion, planted):
    tmp = self.create_tempdir().full_path
    x = np.random.default_rng(0).standard_normal((60, 8, 8, 3)).astype(np.float32)
    x[..., 2] = 0.0
    plan_path = os.path.join(tmp, "plan.json")
    _run(_criteria_model(), tmp, x, ratio=0.25, criterion=criterion, plan_out=plan_path)
    with open(plan_path, encoding="utf-8") as f:
      import json  # pylint: disable=g-import-not-at-top
      plan = json.load(f)
    group = next(g for g in plan["groups"] if g["sources"] == ["conv1"])
    removed = sorted(set(range(8)) - set(group["keep"]))
    if planted is None:   # the weight criterion keeps the planted, large filters
      self.assertTrue(set(removed) <= {4, 5, 6, 7}, removed)
    else:
      self.assertEqual(removed, planted)


class SamplesTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.tmp = self.create_tempdir().full_path
    self.model = _constant_channels_model()
    self.src = os.path.join(self.tmp, "in.onnx")
    onnx.save(self.model, self.src)

  def _prune(self, x):
    return pipeline.prune(self.src, os.path.join(self.tmp, "out.onnx"), pipeline.Options(
        ratio=0.25, calibration=samples_lib.Spec(_write_npz(self.tmp, x)),
        reconstruct=reconstruct_lib.Options("bias")))

  def test_wrong_shape(self):
    with self.assertRaisesRegex(errors.InputError, r"shape \[9, 9, 3\].*takes \[8, 8, 3\]"):
      self._prune(np.zeros((10, 9, 9, 3), np.float32))

  def test_empty(self):
    with self.assertRaisesRegex(errors.InputError, "no samples"):
      self._prune(np.zeros((0, 8, 8, 3), np.float32))

  def test_non_finite(self):
    x = np.zeros((10, 8, 8, 3), np.float32)
    x[3, 1, 1, 0] = np.nan
    with self.assertRaisesRegex(errors.InputError, r"NaN or infinite values \(sample 3"):
      self._prune(x)

  def test_nchw_model_gets_nhwc_data_transposed(self):
    spec = samples_lib.Spec(_write_npz(self.tmp, np.arange(20 * 8 * 8 * 3, dtype=np.float32)
                                       .reshape(20, 8, 8, 3)), samples=16, holdout=4)
    prepared = pipeline.prepare(self.src)
    got = spec.load(prepared.format, prepared.graph)
    self.assertEqual(got.fit.shape, (16, 3, 8, 8))
    self.assertEqual(got.holdout.shape, (4, 3, 8, 8))
    self.assertEqual(got.fit[0, 1, 0, 0], 1.0)   # channel 1 of pixel (0, 0)


if __name__ == "__main__":
  absltest.main()
