"""The TensorFlow op kinds users ask for most, each pruned through with the oracle
passing: Keras grouped convolution (an XLA function call), channel shuffle,
Split/SplitV and channel slices, GatherV2, DepthToSpace/SpaceToDepth, dilated
convolution through SpaceToBatchND/BatchToSpaceND, transposed convolution
(Conv2DBackpropInput), Einsum, constant Pad of the channel axis."""

import json
import os

import keras
import numpy as np
import tensorflow as tf
from absl.testing import absltest
from tensorflow.python.framework import convert_to_constants

from graph_prune import pipeline
from graph_prune.adapters import tf_model

_RNG = np.random.default_rng(3)


def _c(*shape):
  return tf.constant((_RNG.standard_normal(shape) * 0.3).astype(np.float32))


def _conv(x, cin, cout, k=3):
  return tf.nn.relu(tf.nn.bias_add(tf.nn.conv2d(x, _c(k, k, cin, cout), 1, "SAME"), _c(cout)))


def _head(h, cin):
  return tf.identity(tf.reduce_mean(tf.nn.conv2d(h, _c(1, 1, cin, 4), 1, "SAME"), [1, 2]),
                     name="out")


class TFOpKindsTest(absltest.TestCase):

  def _prune(self, graph_def, groups=None, **kw):
    tmp = self.create_tempdir().full_path
    src, out = os.path.join(tmp, "in.pb"), os.path.join(tmp, "out.pb")
    with open(src, "wb") as f:
      f.write(graph_def.SerializeToString())
    doc = pipeline.prune(src, out, pipeline.Options(**kw))
    self.assertTrue(doc["verify"]["passed"], doc["verify"])
    self.assertLessEqual(doc["verify"]["max_rel_diff"], 1e-5)
    self.assertGreater(doc["verify"]["effect_max_rel"], 0.0)
    if groups is not None:
      self.assertEqual(doc["groups_pruned"], groups, doc["skipped"])
    model = tf_model.load(out)
    x = np.random.default_rng(0).standard_normal((2, 8, 8, 3)).astype(np.float32)
    y = tf_model.Runner(model)([x])[0]
    self.assertEqual(y.shape, (2, 4))
    return doc, tf_model.to_view(model)

  def _graph(self, body):
    with tf.Graph().as_default() as g:
      x = tf.compat.v1.placeholder(tf.float32, [None, 8, 8, 3], name="x")
      body(x)
    return g.as_graph_def()

  def _filters(self, v, op="Conv2D"):
    return sorted(v.constants[n.inputs[1]].shape for n in v.nodes if n.op == op)

  def test_keras_grouped_convolution_in_an_xla_call(self):
    inp = keras.Input((8, 8, 3))
    h = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(inp)
    h = keras.layers.Conv2D(8, 3, padding="same", groups=2, activation="relu")(h)
    h = keras.layers.Conv2D(4, 1)(h)
    out = keras.layers.GlobalAveragePooling2D()(h)
    m = keras.Model(inp, out)
    for w in m.weights:   # random biases too
      w.assign(_RNG.standard_normal(w.shape).astype(np.float32) * 0.3)
    fn = tf.function(lambda x: m(x)).get_concrete_function(tf.TensorSpec([None, 8, 8, 3]))
    gd = convert_to_constants.convert_variables_to_constants_v2(fn).graph.as_graph_def()
    self.assertTrue(any(n.op == "StatefulPartitionedCall" for n in gd.node))
    doc, v = self._prune(gd, groups=2)
    # 8 filters of the first layer are 4 units of 2 (one per group): 2 go; the
    # grouped layer keeps 2 of each group's 4 inputs and 2 of its 4 outputs.
    self.assertEqual(self._filters(v), [(1, 1, 4, 4), (3, 3, 2, 4), (3, 3, 3, 4)])

  def test_channel_shuffle(self):
    def body(x):
      h = _conv(x, 3, 8)
      h = tf.reshape(h, [-1, 8, 8, 2, 4])
      h = tf.reshape(tf.transpose(h, [0, 1, 2, 4, 3]), [-1, 8, 8, 8])
      _head(_conv(h, 8, 8), 8)
    doc, v = self._prune(self._graph(body), groups=2)
    self.assertEqual(self._filters(v), [(1, 1, 4, 4), (3, 3, 3, 4), (3, 3, 4, 4)])

  def test_split_and_split_v(self):
    def body(x):
      h = _conv(x, 3, 8)
      a, b = tf.split(h, 2, axis=3)
      c, d = tf.split(_conv(x, 3, 8), [2, 6], axis=3)
      y = tf.concat([_conv(a, 4, 4), _conv(b, 4, 4), c, _conv(d, 6, 4)], axis=3)
      _head(y, 14)
    doc, v = self._prune(self._graph(body))
    # The equal split's halves stay equal (2 + 2 of 8 kept); SplitV's sizes are the
    # kept counts of its two runs, each at least 1.
    split_v = next(n for n in v.nodes if n.op == "SplitV")
    sizes = v.constants[split_v.inputs[1]].tolist()
    self.assertEqual(sum(sizes), 4)
    self.assertTrue(all(k >= 1 for k in sizes), sizes)
    readers = {n.inputs[0]: v.constants[n.inputs[1]].shape[2] for n in v.nodes
               if n.op == "Conv2D"}
    split = next(n for n in v.nodes if n.op == "Split")
    self.assertEqual([readers[t] for t in split.outputs], [2, 2])
    self.assertEqual(readers[split_v.outputs[1]], sizes[1])

  def test_channel_slice(self):
    def body(x):
      h = _conv(x, 3, 8)
      _head(_conv(h[:, :, :, 2:6], 4, 6), 6)
    tmp = self.create_tempdir().full_path
    plan = os.path.join(tmp, "plan.json")
    doc, v = self._prune(self._graph(body), plan_out=plan)
    with open(plan, encoding="utf-8") as f:
      keep = next(g["keep"] for g in json.load(f)["groups"] if g["channels"] == 8)
    taken = [k for k in keep if 2 <= k < 6]
    sliced = next(n for n in v.nodes if n.op == "StridedSlice" and n.inputs[0] != "x:0")
    begin, end = (v.constants[t].tolist()[3] for t in sliced.inputs[1:3])
    self.assertEqual((begin, end), (sum(k < 2 for k in keep), sum(k < 6 for k in keep)))
    reader = next(n for n in v.nodes if n.op == "Conv2D" and n.inputs[0] == sliced.outputs[0])
    self.assertEqual(v.constants[reader.inputs[1]].shape[2], len(taken))

  def test_gather_constant_indices(self):
    def body(x):
      h = _conv(x, 3, 8)
      _head(_conv(tf.gather(h, [6, 1, 3, 1], axis=3), 4, 6), 6)
    self._prune(self._graph(body))

  def test_depth_to_space_and_space_to_depth(self):
    def body(x):
      h = tf.nn.depth_to_space(_conv(x, 3, 16), 2)          # 4 channels, 16x16
      h = tf.nn.space_to_depth(_conv(h, 4, 4), 2)           # 16 channels, 8x8
      _head(_conv(h, 16, 8), 8)
    doc, v = self._prune(self._graph(body), groups=3)

  def test_dilated_convolution(self):
    def body(x):
      h = _conv(x, 3, 8)
      h = tf.nn.relu(tf.nn.atrous_conv2d(h, _c(3, 3, 8, 8), 2, "SAME"))
      _head(h, 8)
    g = self._graph(body)
    self.assertTrue(any(n.op == "SpaceToBatchND" for n in g.node))
    doc, v = self._prune(g, groups=2)

  def test_transposed_convolution(self):
    inp = keras.Input((8, 8, 3))
    h = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(inp)
    h = keras.layers.Conv2DTranspose(6, 3, strides=2, padding="same", activation="relu")(h)
    h = keras.layers.Conv2D(4, 1)(h)
    m = keras.Model(inp, keras.layers.GlobalAveragePooling2D()(h))
    for w in m.weights:
      w.assign(_RNG.standard_normal(w.shape).astype(np.float32) * 0.3)
    fn = tf.function(lambda x: m(x)).get_concrete_function(tf.TensorSpec([None, 8, 8, 3]))
    gd = convert_to_constants.convert_variables_to_constants_v2(fn).graph.as_graph_def()
    doc, v = self._prune(gd, groups=2)
    self.assertEqual(self._filters(v, "Conv2DBackpropInput"), [(3, 3, 3, 4)])

  def test_einsum(self):
    def body(x):
      h = _conv(x, 3, 8)
      h = tf.nn.relu(tf.einsum("bhwc,co->bhwo", h, _c(8, 6)))
      _head(h, 6)
    doc, v = self._prune(self._graph(body), groups=2)

  def test_constant_pad_of_the_channel_axis(self):
    def body(x):
      h = tf.pad(_conv(x, 3, 8), [[0, 0], [0, 0], [0, 0], [2, 1]])
      _head(h, 11)
    doc, v = self._prune(self._graph(body), groups=1)
    self.assertEqual(self._filters(v)[0][2:], (7, 4))


if __name__ == "__main__":
  absltest.main()
