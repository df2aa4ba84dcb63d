"""3-D convolution (TensorFlow Conv3D, ONNX 5-D Conv) with its pooling and batch
norm, supported by op descriptions alone: planted dead channels are found and
removed exactly, the oracle passes, FLOPs count the depth axis."""

import os

import numpy as np
import onnx
import onnxruntime
import tensorflow as tf
from absl.testing import absltest
from onnx import helper
from onnx import numpy_helper

from graph_prune import pipeline
from graph_prune import plan as plan_lib
from graph_prune.adapters import tf_model

_DEAD = [1, 4, 6]
_F = onnx.TensorProto.FLOAT


def _dead(w, axis, bias):
  """Zero filters and bias of channels _DEAD: exactly-zero activations."""
  w = w.copy()
  index = [slice(None)] * w.ndim
  index[axis] = _DEAD
  w[tuple(index)] = 0
  bias = bias.copy()
  bias[_DEAD] = 0
  return w, bias


class Conv3DTest(absltest.TestCase):

  def _check_plan(self, tmp):
    with open(os.path.join(tmp, "plan.json"), encoding="utf-8") as f:
      plan = plan_lib.Plan.from_json(f.read())
    self.assertEqual([g.removed for g in plan.groups if g.removed], [tuple(_DEAD)])

  def test_tensorflow_conv3d(self):
    rng = np.random.default_rng(0)
    c = lambda *s: (rng.standard_normal(s) * 0.3).astype(np.float32)
    w1, b1 = _dead(c(3, 3, 3, 2, 8), 4, c(8))
    with tf.Graph().as_default() as g:
      x = tf.compat.v1.placeholder(tf.float32, [None, 6, 8, 8, 2], name="x")
      h = tf.nn.relu(tf.nn.bias_add(tf.nn.conv3d(x, w1, [1] * 5, "SAME"), b1))
      h = tf.nn.max_pool3d(h, 2, 2, "VALID")
      h = tf.nn.conv3d(h, c(3, 3, 3, 8, 6), [1] * 5, "SAME")
      h, _, _ = tf.compat.v1.nn.fused_batch_norm(
          h, np.abs(c(6)) + 0.5, c(6), mean=c(6), variance=np.abs(c(6)) + 0.5,
          is_training=False, data_format="NDHWC")
      h = tf.nn.avg_pool3d(tf.nn.relu(h), [1, 1, 2, 2, 1], [1, 1, 2, 2, 1], "VALID")
      tf.identity(tf.matmul(tf.reduce_mean(h, [1, 2, 3]), c(6, 5)), name="out")
    tmp = self.create_tempdir().full_path
    src, out = os.path.join(tmp, "in.pb"), os.path.join(tmp, "out.pb")
    with open(src, "wb") as f:
      f.write(g.as_graph_def().SerializeToString())
    doc = pipeline.prune(src, out, pipeline.Options(
        ratio=0.0, overrides=(("Conv3D", 3 / 8),), plan_out=os.path.join(tmp, "plan.json")))
    self.assertTrue(doc["verify"]["passed"])
    self._check_plan(tmp)
    # conv1: 2*(6*8*8*8 outputs)*27*2; conv2: 2*(3*4*4*6)*27*8; then 5 of 8 channels remain.
    self.assertEqual(doc["flops_before"], 2 * 6 * 8 * 8 * 8 * 27 * 2 + 2 * 3 * 4 * 4 * 6 * 27 * 8
                     + 2 * 6 * 5)
    self.assertEqual(doc["flops_after"], 2 * 6 * 8 * 8 * 5 * 27 * 2 + 2 * 3 * 4 * 4 * 6 * 27 * 5
                     + 2 * 6 * 5)
    xs = np.random.default_rng(1).standard_normal((2, 6, 8, 8, 2)).astype(np.float32)
    before = tf_model.Runner(tf_model.load(src))([xs])[0]
    after = tf_model.Runner(tf_model.load(out))([xs])[0]
    np.testing.assert_allclose(after, before, rtol=0, atol=1e-5)
    view = tf_model.to_view(tf_model.load(out))
    shapes = sorted(view.constants[n.inputs[1]].shape for n in view.nodes if n.op == "Conv3D")
    self.assertEqual(shapes, [(3, 3, 3, 2, 5), (3, 3, 3, 5, 6)])

  def test_onnx_5d_conv(self):
    rng = np.random.default_rng(2)
    c = lambda *s: (rng.standard_normal(s) * 0.3).astype(np.float32)
    w1, b1 = _dead(c(8, 2, 3, 3, 3), 0, c(8))
    inits = {"w1": w1, "b1": b1, "w2": c(6, 8, 3, 3, 3), "s": np.abs(c(6)) + 0.5, "b": c(6),
             "m": c(6), "v": np.abs(c(6)) + 0.5, "fc": c(6, 5)}
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1] * 6, name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2, 2], strides=[2, 2, 2]),
        helper.make_node("Conv", ["p1", "w2"], ["c2"], pads=[1] * 6, name="conv2"),
        helper.make_node("BatchNormalization", ["c2", "s", "b", "m", "v"], ["n2"]),
        helper.make_node("Relu", ["n2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("MatMul", ["f", "fc"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "conv3d", [helper.make_tensor_value_info("x", _F, ["N", 2, 6, 8, 8])],
        [helper.make_tensor_value_info("y", _F, ["N", 5])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    tmp = self.create_tempdir().full_path
    src, out = os.path.join(tmp, "in.onnx"), os.path.join(tmp, "out.onnx")
    onnx.save_model(model, src)
    doc = pipeline.prune(src, out, pipeline.Options(
        ratio=0.0, overrides=(("conv1", 3 / 8),), plan_out=os.path.join(tmp, "plan.json")))
    self.assertTrue(doc["verify"]["passed"])
    self._check_plan(tmp)
    self.assertEqual(doc["flops_after"], 2 * 6 * 8 * 8 * 5 * 27 * 2 + 2 * 3 * 4 * 4 * 6 * 27 * 5
                     + 2 * 6 * 5)
    xs = np.random.default_rng(3).standard_normal((2, 2, 6, 8, 8)).astype(np.float32)
    run = lambda p: onnxruntime.InferenceSession(
        p, providers=["CPUExecutionProvider"]).run(None, {"x": xs})[0]
    np.testing.assert_allclose(run(out), run(src), rtol=0, atol=1e-5)
    weights = {t.name: t.dims for t in onnx.load(out).graph.initializer}
    self.assertEqual(list(weights["w1"]), [5, 2, 3, 3, 3])
    self.assertEqual(list(weights["w2"]), [6, 5, 3, 3, 3])


if __name__ == "__main__":
  absltest.main()
