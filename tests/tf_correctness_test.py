"""Regression tests for TensorFlow graphs that once gave a traceback, a false
refusal or a rule that said something false (the adversarial battery of the
correctness issue). Each test names the bug it guards against."""

import os
import subprocess
import sys

import numpy as np
import tensorflow as tf
from absl.testing import absltest
from tensorflow.python.ops import gen_nn_ops

from graph_prune import errors
from graph_prune import pipeline
from graph_prune.adapters import tf_model

_RNG = np.random.default_rng(11)


def _c(*shape):
  return tf.constant((_RNG.standard_normal(shape) * 0.3).astype(np.float32))


def _conv(x, cin, cout, k=3, padding="SAME"):
  return tf.nn.relu(tf.nn.bias_add(tf.nn.conv2d(x, _c(k, k, cin, cout), 1, padding), _c(cout)))


class TFCorrectnessTest(absltest.TestCase):

  def _write(self, graph):
    tmp = self.create_tempdir().full_path
    path = os.path.join(tmp, "in.pb")
    with open(path, "wb") as f:
      f.write(graph.as_graph_def().SerializeToString())
    return tmp, path

  def _prune(self, graph, **kw):
    tmp, path = self._write(graph)
    out = os.path.join(tmp, "out.pb")
    doc = pipeline.prune(path, out, pipeline.Options(**kw))
    self.assertTrue(doc["verify"]["passed"], doc["verify"])
    return doc, path, out

  def _reasons(self, doc):
    return [r for g in doc["skipped"] for r in g["reasons"]]

  def test_max_pool_v2_window_is_read_from_its_inputs(self):
    # Bug: MaxPoolV2 (window and strides as tensors) was read as if it had
    # attributes: its depth pooling passed channels through, and the next layer's
    # slicing failed with "AssertionError: mask of 16 does not fit axis 2".
    with tf.Graph().as_default() as g:
      x = tf.compat.v1.placeholder(tf.float32, [None, 8, 8, 3], name="x")
      h = _conv(_conv(x, 3, 8), 8, 16)
      h = gen_nn_ops.max_pool_v2(h, ksize=tf.constant([1, 1, 1, 2]),
                                 strides=tf.constant([1, 1, 1, 2]), padding="VALID")
      tf.identity(tf.reduce_mean(_conv(h, 8, 4), [1, 2]), name="out")
    doc, _, _ = self._prune(g)
    self.assertIn("MaxPoolV2 'MaxPoolV2': pools across channels", self._reasons(doc))
    self.assertEqual([grp["sources"] for grp in doc["groups"]], [["Conv2D"]])

  def test_matmul_reading_channels_as_rows(self):
    # Bug: a MatMul whose first operand carries channels on its rows had its
    # weight's rows cut by them: "the pruned graph is invalid ... please report".
    with tf.Graph().as_default() as g:
      x = tf.compat.v1.placeholder(tf.float32, [1, 4, 4, 3], name="x")
      h = _conv(_conv(x, 3, 8), 8, 16)                 # [1, 4, 4, 16]
      h = tf.transpose(tf.reshape(h, [16, 16]))        # rows: channels
      tf.identity(tf.matmul(h, _c(16, 5)), name="out")
    doc, _, _ = self._prune(g)
    self.assertIn("MatMul 'MatMul': channels are not the contracted axis", self._reasons(doc))
    self.assertEqual(doc["groups_pruned"], 1)

  def test_while_loop_after_a_convolutional_extractor(self):
    # Bug: a graph with a while loop (frozen TF 2 loops and LSTMs are lowered to
    # TF 1 control flow) was refused whole: "the graph has a cycle".
    tf.compat.v1.disable_control_flow_v2()
    try:
      with tf.Graph().as_default() as g:
        x = tf.compat.v1.placeholder(tf.float32, [None, 8, 8, 3], name="x")
        h = _conv(_conv(x, 3, 16), 16, 8)
        seq = tf.reshape(h, [-1, 64, 8])
        w = _c(8, 8)

        def body(i, s):
          return i + 1, tf.tanh(tf.matmul(s, w) + tf.reduce_mean(seq, 1))
        _, s = tf.compat.v1.while_loop(lambda i, s: i < 3, body,
                                       [tf.constant(0), tf.zeros_like(seq[:, 0, :])])
        tf.identity(s, name="out")
    finally:
      tf.compat.v1.enable_control_flow_v2()
    doc, _, out = self._prune(g)
    self.assertEqual([grp["sources"] for grp in doc["groups"]], [["Conv2D"]])
    self.assertTrue(any("inside the body of loop" in r for r in self._reasons(doc)),
                    self._reasons(doc))
    view = tf_model.to_view(tf_model.load(out))
    filters = sorted(view.constants[n.inputs[1]].shape for n in view.nodes if n.op == "Conv2D")
    self.assertEqual(filters, [(3, 3, 3, 8), (3, 3, 8, 8)])

  def test_fully_dynamic_spatial_dims(self):
    # Bug: unknown spatial dims were fed as 2x2; an unpadded 5x5 convolution then
    # failed and the run was refused as "differs from the masked original by inf".
    with tf.Graph().as_default() as g:
      x = tf.compat.v1.placeholder(tf.float32, [None, None, None, 3], name="x")
      h = _conv(_conv(x, 3, 8, k=5, padding="VALID"), 8, 8, padding="VALID")
      tf.identity(tf.reduce_mean(_conv(h, 8, 4), [1, 2]), name="out")
    doc, _, _ = self._prune(g)
    self.assertEqual(doc["groups_pruned"], 2)

  def test_nchw_graph_on_a_cpu_without_onednn(self):
    # Bug: on a CPU without oneDNN (no AVX-512; or TF_ENABLE_ONEDNN_OPTS=0) the
    # oracle's session failed on an NCHW MaxPool: "Default MaxPoolingOp only
    # supports NHWC on device type CPU", a traceback. It runs under XLA now.
    with tf.Graph().as_default() as g:
      x = tf.compat.v1.placeholder(tf.float32, [None, 3, 8, 8], name="x")
      h = tf.nn.conv2d(x, _c(3, 3, 3, 8), 1, "SAME", data_format="NCHW")
      h = tf.nn.relu(tf.nn.bias_add(h, _c(8), data_format="NCHW"))
      h = tf.nn.max_pool2d(h, 2, 2, "VALID", data_format="NCHW")
      h = tf.nn.conv2d(h, _c(3, 3, 8, 4), 1, "SAME", data_format="NCHW")
      tf.identity(tf.reduce_mean(h, [2, 3]), name="out")
    tmp, path = self._write(g)
    script = ("import sys\n"
              "from graph_prune import pipeline\n"
              "doc = pipeline.prune(sys.argv[1], sys.argv[2])\n"
              "print('PASSED' if doc['verify']['passed'] else 'FAILED', doc['groups_pruned'])\n")
    env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS="0", TF_CPP_MIN_LOG_LEVEL="3",
               PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    r = subprocess.run([sys.executable, "-c", script, path, os.path.join(tmp, "out.pb")],
                       capture_output=True, text=True, env=env, timeout=300, check=False)
    self.assertEqual(r.returncode, 0, r.stderr[-2000:])
    self.assertIn("PASSED 1", r.stdout)

  def test_non_finite_weight_is_refused(self):
    # Bug: a NaN filter ranked last and was removed although its channel was live.
    with tf.Graph().as_default() as g:
      x = tf.compat.v1.placeholder(tf.float32, [None, 8, 8, 3], name="x")
      w = _RNG.standard_normal((3, 3, 3, 8)).astype(np.float32)
      w[0, 0, 0, 5] = np.inf
      h = tf.nn.relu(tf.nn.conv2d(x, tf.constant(w, name="bad_w"), 1, "SAME"))
      tf.identity(tf.reduce_mean(_conv(h, 8, 4), [1, 2]), name="out")
    tmp, path = self._write(g)
    with self.assertRaisesRegex(errors.InputError, "'bad_w:0' .* NaN or infinite"):
      pipeline.prune(path, os.path.join(tmp, "out.pb"))
    self.assertEqual(os.listdir(tmp), ["in.pb"])


if __name__ == "__main__":
  absltest.main()
