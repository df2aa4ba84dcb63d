"""Acceptance: Keras applications (weights=None, randomised statistics) pruned at 0.5 with l1.

One Bazel target per architecture (--arch). Each prunes the frozen GraphDef and
the SavedModel, checks verification (relative difference <= 1e-4), that the
parameters dropped by the architecture's floor, that every group left whole
says why, and that the SavedModel comes back with the same signature.
"""

import os

import numpy as np
import onnx
import onnxruntime
import tensorflow as tf
import tf2onnx
from absl import flags
from absl.testing import absltest

from graph_prune import pipeline
from tests import keras_zoo

_ARCH = flags.DEFINE_string("arch", "VGG16", "Architecture from keras_zoo.ARCHITECTURES.")

# Least fraction of parameters removed at ratio 0.5, per architecture. Set
# below what was measured, so that a rule that stops firing fails the test.
MIN_PARAM_REDUCTION = {
    "VGG16": 0.7, "ResNet50": 0.7, "ResNet50V2": 0.7, "MobileNet": 0.7, "MobileNetV2": 0.7,
    "MobileNetV3Small": 0.7, "DenseNet121": 0.7, "InceptionV3": 0.7, "Xception": 0.7,
    "EfficientNetB0": 0.7, "EfficientNetV2B0": 0.7, "NASNetMobile": 0.7,
    # LayerNorm couples the whole residual stream; only the MLP hidden units prune.
    "ConvNeXtTiny": 0.4,
}

# tf2onnx 1.17 cannot convert these frozen graphs at all (not a pruning limit):
# ConvNeXt's exact GELU uses Erfc and its grouped convolutions are XLA-compiled
# function calls, neither of which tf2onnx supports.
TF2ONNX_UNSUPPORTED = {"ConvNeXtTiny": "tf2onnx 1.17 has no converter for Erfc and XLA "
                                        "function calls (StatefulPartitionedCall)"}


class KerasAppsTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.arch = _ARCH.value
    cls.tmp = absltest.get_default_test_tmpdir()
    cls.fixture = keras_zoo.Fixture(cls.arch, cls.tmp)
    cls.x = keras_zoo.sample_input(cls.arch)
    cls.graph_def = cls.fixture.graph_def()
    cls.pb = cls.fixture.pb

  def _check_report(self, doc):
    v = doc["verify"]
    self.assertTrue(v["passed"])
    self.assertLessEqual(v["max_rel_diff"], 1e-4)
    reduction = 1 - doc["params_after"] / doc["params_before"]
    self.assertGreaterEqual(reduction, MIN_PARAM_REDUCTION[self.arch],
                            f"only {reduction:.1%} of parameters removed")
    self.assertLess(doc["flops_after"], doc["flops_before"])
    self.assertGreater(doc["groups_pruned"], 0)
    for g in doc["skipped"]:
      self.assertTrue(g["reasons"] and all(g["reasons"]), g)
    for g in doc["groups"]:
      self.assertLess(g["channels_after"], g["channels_before"])
    return reduction

  def test_graphdef_and_saved_model(self):
    out_pb = os.path.join(self.tmp, f"{self.arch}_pruned.pb")
    before = open(self.pb, "rb").read()
    doc = pipeline.prune(self.pb, out_pb, pipeline.Options(ratio=0.5, criterion="l1"))
    reduction = self._check_report(doc)
    self.assertEqual(open(self.pb, "rb").read(), before, "input file changed")

    # The written file runs on its own and gives the outputs the pipeline verified.
    gd = tf.compat.v1.GraphDef()
    gd.ParseFromString(open(out_pb, "rb").read())
    with tf.Graph().as_default() as g:
      tf.compat.v1.import_graph_def(gd, name="")
      with tf.compat.v1.Session(graph=g) as sess:
        pruned_pb_out = sess.run("Identity:0", {"input:0": self.x})
    self.assertEqual(pruned_pb_out.shape, (2, keras_zoo.NUM_CLASSES))
    self.assertTrue(np.all(np.isfinite(pruned_pb_out)))

    sm = self.fixture.saved_model
    out_sm = os.path.join(self.tmp, f"{self.arch}_sm_pruned")
    doc_sm = pipeline.prune(sm, out_sm, pipeline.Options(ratio=0.5, criterion="l1"))
    self.assertAlmostEqual(1 - doc_sm["params_after"] / doc_sm["params_before"], reduction,
                           delta=0.02)
    original = tf.saved_model.load(sm).signatures["serving_default"]
    pruned = tf.saved_model.load(out_sm).signatures
    self.assertEqual(list(pruned), ["serving_default"])
    pruned = pruned["serving_default"]
    self.assertEqual(pruned.structured_input_signature, original.structured_input_signature)
    self.assertEqual({k: (v.dtype, v.shape.as_list()) for k, v in pruned.structured_outputs.items()},
                     {k: (v.dtype, v.shape.as_list())
                      for k, v in original.structured_outputs.items()})
    out = pruned(input=tf.constant(self.x))["output"].numpy()
    # Same weights, same plan: the SavedModel and the GraphDef prune to the same function.
    np.testing.assert_allclose(out, pruned_pb_out, rtol=1e-4, atol=1e-5)


  def test_onnx_from_tf2onnx(self):
    """The tf2onnx conversion (batch-norm folded into Conv) prunes and verifies in ONNX Runtime."""
    if self.arch in TF2ONNX_UNSUPPORTED:
      self.skipTest(TF2ONNX_UNSUPPORTED[self.arch])
    src = os.path.join(self.tmp, f"{self.arch}.onnx")
    tf2onnx.convert.from_graph_def(self.graph_def, input_names=["input:0"],
                                   output_names=["Identity:0"], opset=17, output_path=src)
    out = os.path.join(self.tmp, f"{self.arch}_pruned.onnx")
    doc = pipeline.prune(src, out, pipeline.Options(ratio=0.5, criterion="l1"))
    self._check_report(doc)
    pruned = onnx.load(out)
    onnx.checker.check_model(pruned, full_check=True)
    onnx.shape_inference.infer_shapes(pruned, check_type=True, strict_mode=True)
    self.assertEqual(pruned.opset_import, onnx.load(src).opset_import)
    sess = onnxruntime.InferenceSession(out, providers=["CPUExecutionProvider"])
    y = sess.run(None, {"input:0": self.x})[0]
    self.assertEqual(y.shape, (2, keras_zoo.NUM_CLASSES))
    self.assertTrue(np.all(np.isfinite(y)))


if __name__ == "__main__":
  absltest.main()
