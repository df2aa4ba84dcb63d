"""ONNX models written by hand with onnx.helper, covering what tf2onnx never emits:
BatchNormalization nodes, Gemm with transB, Flatten -> Gemm, grouped and depthwise
Conv, ConvTranspose, PRelu, Constant-node weights, external data, an opset-9 model,
and planted dead channels."""

import os

import numpy as np
import onnx
import onnxruntime
from absl.testing import absltest
from absl.testing import parameterized
from onnx import helper
from onnx import numpy_helper

from graph_prune import errors
from graph_prune import pipeline
from graph_prune import plan as plan_lib
from tests import onnx_net

_Net = onnx_net.Net


def _run(path, x):
  sess = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
  return sess.run(None, {"x": x})[0]


def _weights(path, load_external=True):
  m = onnx.load(path, load_external_data=load_external)
  return {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}, m


class HandmadeTest(parameterized.TestCase):

  def _prune(self, model, ratio=0.5, external=False, **kw):
    tmp = self.create_tempdir().full_path
    src = os.path.join(tmp, "in.onnx")
    if external:
      onnx.save_model(model, src, save_as_external_data=True, location="in.onnx.data",
                      size_threshold=0)
    else:
      onnx.save_model(model, src)
    before = open(src, "rb").read()
    out = os.path.join(tmp, "out.onnx")
    doc = pipeline.prune(src, out, pipeline.Options(ratio=ratio, **kw))
    self.assertTrue(doc["verify"]["passed"])
    self.assertLessEqual(doc["verify"]["max_rel_diff"], 1e-5)
    self.assertEqual(open(src, "rb").read(), before)
    pruned = onnx.load(out)
    onnx.checker.check_model(pruned, full_check=True)
    onnx.shape_inference.infer_shapes(pruned, check_type=True, strict_mode=True)
    self.assertEqual(pruned.opset_import, model.opset_import)
    self.assertEqual(pruned.ir_version, model.ir_version)
    self.assertEqual(pruned.doc_string, model.doc_string)
    self.assertEqual(pruned.metadata_props, model.metadata_props)
    self.assertEqual([o.name for o in pruned.graph.output], [o.name for o in model.graph.output])
    x = np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)
    self.assertEqual(_run(out, x).shape, _run(src, x).shape)
    return doc, src, out

  def test_batch_norm_flatten_gemm_trans_b(self):
    n = _Net()
    h = n.op("Relu", [n.bn(n.conv("x", 3, 8), 8)])
    h = n.op("MaxPool", [h], kernel_shape=[2, 2], strides=[2, 2])
    h = n.op("Flatten", [h], axis=1)                                   # 8 x 4 x 4 = 128
    h = n.op("Relu", [n.dense(h, (16, 128), trans_b=1)])
    out = n.dense(h, (16, 5))
    doc, _, path = self._prune(n.model(out, [5]))
    w, _ = _weights(path)
    self.assertEqual(w["conv1_w"].shape, (4, 3, 3, 3))
    self.assertEqual(w["gemm1_w"].shape, (8, 64))       # transB: [N, K], both halved
    self.assertEqual(w["gemm1_b"].shape, (8,))
    self.assertEqual(w["gemm2_w"].shape, (8, 5))
    self.assertEqual(doc["groups_pruned"], 2)

  def test_depthwise_and_grouped_conv(self):
    n = _Net()
    h = n.op("Relu", [n.conv("x", 3, 8)])
    h = n.conv(h, 8, 16, group=8)          # depthwise, multiplier 2
    h = n.op("Relu", [n.conv(h, 16, 8, k=1)])
    g = n.conv(h, 8, 8, group=2)            # grouped: each group loses the same positions
    out = n.op("ReduceMean", [g], axes=[2, 3], keepdims=0)
    doc, _, path = self._prune(n.model(out, [8]))
    w, m = _weights(path)
    self.assertEqual(w["conv1_w"].shape, (4, 3, 3, 3))
    self.assertEqual(w["conv2_w"].shape, (8, 1, 3, 3))  # depthwise filters follow their input
    # conv3 feeds the grouped convolution: its 8 outputs are 4 units of 2 (one per
    # group); half go, and each group of conv4 reads 2 of its 4 inputs.
    self.assertEqual(w["conv3_w"].shape, (4, 8, 1, 1))
    self.assertEqual(w["conv4_w"].shape, (8, 2, 3, 3))
    groups = {node.input[1]: helper.get_attribute_value(
        next(a for a in node.attribute if a.name == "group"))
              for node in m.graph.node if node.op_type == "Conv" and len(node.attribute) > 1}
    self.assertEqual(groups, {"conv1_w": 1, "conv2_w": 4, "conv3_w": 1, "conv4_w": 2})
    self.assertEqual(doc["groups_pruned"], 2)

  def test_conv_transpose_prelu_and_constant_node_weights(self):
    n = _Net()
    h = n.conv("x", 3, 6)
    slope = n.op("Constant", [], value=numpy_helper.from_array(
        n.rng.uniform(0.1, 0.3, (6, 1, 1)).astype(np.float32)))
    h = n.op("PRelu", [h, slope])
    wt = n.op("Constant", [], value=numpy_helper.from_array(
        n.rng.standard_normal((6, 4, 2, 2)).astype(np.float32)))
    h = n.op("Relu", [n.op("ConvTranspose", [h, wt, n.weight((4,))], strides=[2, 2])])
    out = n.op("GlobalAveragePool", [n.conv(h, 4, 2)])
    doc, _, path = self._prune(n.model(out, [2, 1, 1]))
    _, m = _weights(path)
    consts = {node.output[0]: numpy_helper.to_array(node.attribute[0].t)
              for node in m.graph.node if node.op_type == "Constant"}
    self.assertEqual(sorted(v.shape for v in consts.values()), [(3, 1, 1), (3, 2, 2, 2)])
    self.assertEqual(doc["groups_pruned"], 2)

  def test_external_data_is_read_and_written(self):
    n = _Net()
    h = n.op("Relu", [n.conv("x", 3, 16)])
    out = n.op("GlobalAveragePool", [n.conv(h, 16, 4)])
    _, _, path = self._prune(n.model(out, [4, 1, 1]), external=True)
    self.assertTrue(os.path.isfile(path + ".data"))
    m = onnx.load(path, load_external_data=False)
    big = [t for t in m.graph.initializer if np.prod(t.dims) * 4 >= 1024]
    self.assertNotEmpty(big)
    self.assertTrue(all(t.data_location == onnx.TensorProto.EXTERNAL for t in big))
    w, _ = _weights(path)
    self.assertEqual(w["conv1_w"].shape, (8, 3, 3, 3))

  def test_regression_model_over_protobuf_limit_is_checked_run_and_written_apart(self):
    """A model whose weights pass protobuf's 2 GiB could not be checked, run or
    written (the checker refused it in memory, ONNX Runtime got a serialisation that
    cannot exist). Here the limit is lowered so that a small model takes that path:
    checked without its weights, run with them handed to ONNX Runtime as arrays,
    written with external data; the result must be what the plain path gives."""
    from unittest import mock  # pylint: disable=g-import-not-at-top
    from graph_prune.adapters import onnx_model  # pylint: disable=g-import-not-at-top
    n = _Net()
    h = n.op("Relu", [n.bn(n.conv("x", 3, 32), 32)])
    h = n.op("Relu", [n.conv(h, 32, 32)])
    out = n.op("GlobalAveragePool", [n.conv(h, 32, 4)])
    model = n.model(out, [4, 1, 1])
    plain, _, plain_out = self._prune(model)
    self.assertFalse(os.path.exists(plain_out + ".data"))
    with mock.patch.object(onnx_model, "_PROTO_LIMIT", 1000), \
         mock.patch.object(onnx_model, "_APART_BYTES", 256), \
         mock.patch.object(onnx_model.onnx.checker, "check_model",
                           wraps=onnx_model.onnx.checker.check_model) as check:
      self.assertTrue(onnx_model.too_large(model))
      # (Only external data can hold such a model: a file of it alone cannot be parsed.)
      tmp = self.create_tempdir().full_path
      src, apart_out = os.path.join(tmp, "in.onnx"), os.path.join(tmp, "out.onnx")
      onnx.save_model(model, src, save_as_external_data=True, location="in.onnx.data",
                      size_threshold=0)
      apart = pipeline.prune(src, apart_out, pipeline.Options(ratio=0.5))
      # Never the whole model in memory: the weights were left out of every check.
      checked = [c.args[0] for c in check.call_args_list]
      self.assertNotEmpty(checked)
      for m in checked:
        if not isinstance(m, str):
          self.assertEqual([t.name for t in m.graph.initializer if np.prod(t.dims) > 1024], [])
    onnx.checker.check_model(apart_out, full_check=True)
    self.assertTrue(os.path.isfile(apart_out + ".data"))
    self.assertEqual((plain["params_after"], plain["groups_pruned"]),
                     (apart["params_after"], apart["groups_pruned"]))
    self.assertLess(plain["params_after"], plain["params_before"])
    self.assertLessEqual(apart["verify"]["max_rel_diff"], 1e-5)
    w_plain, _ = _weights(plain_out)
    w_apart, _ = _weights(apart_out)
    self.assertEqual(sorted(w_plain), sorted(w_apart))
    for name, value in w_plain.items():
      np.testing.assert_array_equal(w_apart[name], value, err_msg=name)
    x = np.random.default_rng(3).standard_normal((2, 3, 8, 8)).astype(np.float32)
    np.testing.assert_array_equal(_run(apart_out, x), _run(plain_out, x))
    # Written with external data because of its size, even where the input had none;
    # and the runner with the weights apart computes what ONNX Runtime does from the file.
    loaded = onnx_model.load(plain_out)
    self.assertFalse(loaded.external_data)
    again = os.path.join(self.create_tempdir().full_path, "again.onnx")
    with mock.patch.object(onnx_model, "_PROTO_LIMIT", 1000), \
         mock.patch.object(onnx_model, "_APART_BYTES", 256):
      onnx_model.write(loaded, again)
      runner = onnx_model.Runner(loaded, optimize=False)
      # The large weights went to ONNX Runtime as arrays, not in a serialisation.
      self.assertNotEmpty(runner._weights)  # pylint: disable=protected-access
      try:
        np.testing.assert_allclose(runner([x])[0], _run(plain_out, x), rtol=1e-6, atol=1e-6)
      finally:
        runner.close()
    self.assertTrue(os.path.isfile(again + ".data"))
    np.testing.assert_array_equal(_run(again, x), _run(plain_out, x))

  def test_opset9_model(self):
    n = _Net()
    h = n.op("Relu", [n.bn(n.conv("x", 3, 8), 8)])
    h = n.op("Pad", [h], pads=[0, 0, 1, 1, 0, 0, 1, 1], mode="constant")
    h = n.op("Clip", [h], min=0.0, max=6.0)
    h = n.op("Upsample", [h, n.op("Constant", [], value=numpy_helper.from_array(
        np.array([1, 1, 2, 2], np.float32)))], mode="nearest")
    h = n.op("ReduceMean", [h], axes=[2, 3], keepdims=1)
    h = n.op("Squeeze", [h], axes=[2, 3])
    h = n.op("Unsqueeze", [h], axes=[2])
    h = n.op("Reshape", [h, n.op("Constant", [], value=numpy_helper.from_array(
        np.array([0, -1], np.int64)))])
    out = n.op("MatMul", [h, n.weight((8, 3), name="fc_w")])
    doc, _, path = self._prune(n.model(out, [3], opset=9, ir_version=4))
    w, _ = _weights(path)
    self.assertEqual(w["conv1_w"].shape, (4, 3, 3, 3))
    self.assertEqual(w["fc_w"].shape, (4, 3))
    self.assertEqual(doc["groups_pruned"], 1)

  def test_planted_dead_channels_are_removed_exactly(self):
    n = _Net()
    h = n.op("Relu", [n.conv("x", 3, 8)])
    h = n.op("Relu", [n.conv(h, 8, 8)])
    out = n.dense(n.op("Flatten", [n.op("GlobalAveragePool", [h])]), (8, 4))
    model = n.model(out, [4])
    dead = [1, 4, 6]
    inits = {t.name: t for t in model.graph.initializer}
    for name in ("conv1_w", "conv1_b"):  # zero filters and zero bias: exactly-zero channels
      value = numpy_helper.to_array(inits[name]).copy()
      value[dead] = 0
      inits[name].CopyFrom(numpy_helper.from_array(value, name))
    tmp = self.create_tempdir().full_path
    doc, src, out_path = self._prune(model, ratio=0.0, overrides=(("conv1", 3 / 8),),
                                     plan_out=os.path.join(tmp, "plan.json"))
    plan = plan_lib.Plan.from_json(open(os.path.join(tmp, "plan.json")).read())
    self.assertEqual([g.removed for g in plan.groups if g.removed], [tuple(dead)])
    x = np.random.default_rng(4).standard_normal((2, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(_run(out_path, x), _run(src, x), rtol=0, atol=1e-5)
    self.assertEqual(doc["params_before"] - doc["params_after"], 3 * (27 + 1) + 3 * 9 * 8)


class BadOnnxTest(absltest.TestCase):

  def test_model_failing_checker(self):
    n = _Net()
    out = n.op("Relu", [n.conv("x", 3, 4)])
    model = n.model(out, [4, 8, 8])
    model.graph.node[0].input[1] = "missing_weight"
    tmp = self.create_tempdir().full_path
    path = os.path.join(tmp, "bad.onnx")
    onnx.save_model(model, path)
    with self.assertRaisesRegex(errors.InputError, "fails onnx.checker"):
      pipeline.prune(path, os.path.join(tmp, "o.onnx"))
    self.assertEqual(os.listdir(tmp), ["bad.onnx"])

  def test_missing_external_data(self):
    n = _Net()
    out = n.op("Relu", [n.conv("x", 3, 4)])
    tmp = self.create_tempdir().full_path
    path = os.path.join(tmp, "ext.onnx")
    onnx.save_model(n.model(out, [4, 8, 8]), path, save_as_external_data=True,
                    location="ext.onnx.data", size_threshold=0)
    os.remove(path + ".data")
    with self.assertRaisesRegex(errors.InputError, "external data .* is missing"):
      pipeline.prune(path, os.path.join(tmp, "o.onnx"))
    self.assertEqual(os.listdir(tmp), ["ext.onnx"])


if __name__ == "__main__":
  absltest.main()
