"""Graphs Keras 3 never writes, built from raw TensorFlow ops: FusedBatchNormV3
(tf.keras 2 / older graphs), NCHW layout, MirrorPad, Transpose/Squeeze/ExpandDims,
per-channel Sub/RealDiv/Maximum/Minimum, squeeze-excite, the activation zoo."""

import os

import numpy as np
import tensorflow as tf
from absl.testing import absltest
from absl.testing import parameterized

from graph_prune import pipeline
from graph_prune.adapters import tf_model

_RNG = np.random.default_rng(7)


def _c(*shape, low=None):
  if low is not None:
    return tf.constant(_RNG.uniform(low, low + 1.0, shape).astype(np.float32))
  return tf.constant(_RNG.standard_normal(shape).astype(np.float32))


def _conv(x, cin, cout, fmt="NHWC", k=3):
  y = tf.nn.conv2d(x, _c(k, k, cin, cout) * 0.3, 1, "SAME", data_format=fmt)
  return tf.nn.bias_add(y, _c(cout), data_format=fmt)


def _fused_bn(x, c, fmt="NHWC"):
  y, _, _ = tf.compat.v1.nn.fused_batch_norm(
      x, _c(c, low=0.5), _c(c), mean=_c(c), variance=_c(c, low=0.5), is_training=False,
      data_format=fmt)
  return y


def _write(graph, tmp, name):
  path = os.path.join(tmp, name)
  with open(path, "wb") as f:
    f.write(graph.as_graph_def().SerializeToString())
  return path


def _widths(path):
  model = tf_model.load(path)
  g = tf_model.to_view(model)
  return sorted(g.constants[n.inputs[1]].shape[3] for n in g.nodes if n.op == "Conv2D")


class RawGraphsTest(parameterized.TestCase):

  def _prune(self, graph, ratio=0.5, **kw):
    tmp = self.create_tempdir().full_path
    pb = _write(graph, tmp, "in.pb")
    out = os.path.join(tmp, "out.pb")
    doc = pipeline.prune(pb, out, pipeline.Options(ratio=ratio, **kw))
    self.assertTrue(doc["verify"]["passed"], doc["verify"])
    self.assertLessEqual(doc["verify"]["max_rel_diff"], 1e-5)
    return doc, pb, out

  def test_fused_batch_norm_and_activation_zoo(self):
    with tf.Graph().as_default() as g:
      x = tf.compat.v1.placeholder(tf.float32, [None, 16, 16, 3], name="x")
      h = tf.nn.relu(_fused_bn(_conv(x, 3, 8), 8))
      acts = [tf.nn.relu6, tf.nn.elu, tf.nn.selu, tf.nn.leaky_relu, tf.tanh, tf.sigmoid,
              lambda t: t * tf.sigmoid(t),                          # swish
              lambda t: t * tf.nn.relu6(t + 3.0) / 6.0]             # hard-swish
      for i, act in enumerate(acts):
        h = act(_fused_bn(_conv(h, 8, 8), 8))
        h = tf.maximum(h, _c(8) * 0.1) if i % 2 else tf.minimum(h, _c(8, low=2.0))
        h = (h - _c(8)) / _c(8, low=1.0)
      h = tf.pad(h, [[0, 0], [1, 1], [2, 2], [0, 0]], mode="REFLECT")
      h = tf.nn.avg_pool2d(h, 2, 2, "VALID")
      h = tf.reduce_mean(h, axis=[1, 2], keepdims=True)
      h = tf.squeeze(h, axis=[1, 2])
      h = tf.matmul(h, _c(8, 5))
      tf.identity(h, name="out")
    doc, _, out = self._prune(g)
    self.assertEqual(doc["groups_pruned"], 9)  # a chain: every convolution is its own group
    self.assertEqual(_widths(out), [4] * 9)

  def test_nchw_convolutions_and_batch_norm(self):
    with tf.Graph().as_default() as g:
      x = tf.compat.v1.placeholder(tf.float32, [None, 3, 8, 8], name="x")
      h = tf.nn.relu(_fused_bn(_conv(x, 3, 6, "NCHW"), 6, "NCHW"))
      h = tf.nn.relu(_conv(h, 6, 10, "NCHW"))
      h = tf.nn.max_pool2d(h, 2, 2, "VALID", data_format="NCHW")
      h = tf.reshape(h, [-1, 10 * 4 * 4])
      tf.identity(tf.matmul(h, _c(160, 4)), name="out")
    try:
      doc, _, out = self._prune(g)
    except tf.errors.UnimplementedError:
      self.skipTest("this TensorFlow build cannot run NCHW convolutions on the CPU")
    self.assertEqual(_widths(out), [3, 5])
    self.assertEqual(doc["groups_pruned"], 2)

  def test_squeeze_excite_and_transpose(self):
    with tf.Graph().as_default() as g:
      x = tf.compat.v1.placeholder(tf.float32, [None, 8, 8, 3], name="x")
      h = tf.nn.relu(_conv(x, 3, 12))
      s = tf.reduce_mean(h, axis=[1, 2], keepdims=True)
      s = tf.nn.relu(_conv(s, 12, 4, k=1))
      s = tf.sigmoid(_conv(s, 4, 12, k=1))
      h = h * s
      h = tf.transpose(h, [0, 3, 1, 2])                 # NCHW view of the channels
      h = tf.expand_dims(tf.reduce_max(h, axis=[2, 3]), 1)
      tf.identity(tf.matmul(tf.squeeze(h, [1]), _c(12, 3)), name="out")
    doc, _, out = self._prune(g)
    # The squeeze-excite expansion is coupled with the block it scales.
    se = [grp for grp in doc["groups"] if len(grp["sources"]) == 2]
    self.assertLen(se, 1)
    self.assertEqual(_widths(out), [2, 6, 6])

  def test_channel_slice_is_followed(self):
    # A slice of the channel axis once blocked its group; it is followed now, its
    # bounds rewritten to the kept counts (more in //tests:tf_op_kinds_test).
    with tf.Graph().as_default() as g:
      x = tf.compat.v1.placeholder(tf.float32, [None, 8, 8, 3], name="x")
      h = tf.nn.relu(_conv(x, 3, 8))
      h = h[:, :, :, :4]
      tf.identity(_conv(h, 4, 2), name="out")
    doc, _, _ = self._prune(g)
    self.assertEqual([grp["sources"] for grp in doc["groups"]], [["Conv2D"]])

if __name__ == "__main__":
  absltest.main()
