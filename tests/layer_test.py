"""--mode=layer: whole residual blocks removed and plain layers made the identity
(analysis/blocks.py), checked by the oracle against the original with the removed
branches' last layers zeroed and the removed layers' weights the identity kernel.

ResNet50 has 16 bottleneck blocks, 4 of them with a projection shortcut (not
removable: the shapes differ; their 3x3 layer is a removable plain layer, as is
the first block's 1x1 64 -> 64 layer); ResNet50V2's blocks follow each other
without an activation between, so removing neighbours chains their shortcuts.
VGG16 has 10 plain layers whose input and output shapes match.
"""

import os

import numpy as np
import onnx
import onnxruntime
from absl.testing import absltest
from absl.testing import parameterized
from onnx import numpy_helper

from graph_prune import errors
from graph_prune import pipeline
from graph_prune.adapters import tf_model
from tests import keras_zoo
from tests import onnx_net


def _producer_add(tensor):
  """The node name of a TensorFlow tensor name ('add:0' -> 'add')."""
  return tensor.split(":")[0]


def _convs(graph_def):
  return sum(n.op == "Conv2D" for n in graph_def.node)


def _residual_net(zero_second=True):
  """stem conv -> two residual blocks (conv-relu-conv added to the block input, then
  relu) -> GAP -> dense. The second block's last conv is all zero when zero_second."""
  n = onnx_net.Net(seed=7)
  x = n.op("Relu", [n.conv("x", 3, 8)])
  for k in range(2):
    branch = n.conv(n.op("Relu", [n.conv(x, 8, 8)]), 8, 8)
    if zero_second and k == 1:
      last = n.nodes[-1]
      for t in n.inits:
        if t.name in last.input[1:]:
          t.CopyFrom(numpy_helper.from_array(np.zeros_like(numpy_helper.to_array(t)), t.name))
    x = n.op("Relu", [n.op("Add", [x, branch])])
  g = n.op("Flatten", [n.op("GlobalAveragePool", [x])])
  return n.model(n.dense(g, (8, 4)), [4], size=8)


class LayerModeTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.tmp = self.create_tempdir().full_path

  def test_resnet50_graphdef(self):
    fixture = keras_zoo.Fixture("ResNet50", self.tmp)
    out = os.path.join(self.tmp, "r50_layers.pb")
    doc = pipeline.prune(fixture.pb, out, pipeline.Options(ratio=0.5, mode="layer"))
    lay = doc["layers"]
    self.assertEqual((lay["removable_blocks"], lay["removable_layers"], lay["removed"]),
                     (12, 5, 8))
    self.assertEqual(lay["removed_blocks"] + lay["removed_layers"], 8)
    self.assertEqual(lay["needs_recovery"], lay["removed_layers"] > 0)
    # The 4 projection blocks: their shortcut is a convolution of the block input,
    # which the branch reads too (or, with a stride, the shapes differ).
    self.assertLen(lay["not_removable"], 4)
    for skipped in lay["not_removable"]:
      self.assertRegex(skipped["reason"], "outside the branch reads|not a same-shape residual")
    self.assertTrue(doc["verify"]["passed"])
    self.assertLessEqual(doc["verify"]["max_rel_diff"], 1e-5)
    self.assertGreater(doc["verify"]["effect_max_rel"], 1e-3)     # the blocks did something
    self.assertLess(doc["flops_after"], 0.9 * doc["flops_before"])
    before, after = tf_model.load(fixture.pb).graph_def, tf_model.load(out).graph_def
    self.assertEqual(_convs(before) - _convs(after),
                     sum(b["linear_layers"] for b in lay["blocks"] if b["removed"]))
    x = keras_zoo.sample_input("ResNet50")
    runner = tf_model.Runner(tf_model.load(out))
    self.assertEqual(runner([x])[0].shape, (2, keras_zoo.NUM_CLASSES))
    runner.close()
    # The least important go first: every removed block scores at most every kept one.
    removed = [b["score"] for b in lay["blocks"] if b["removed"]]
    kept = [b["score"] for b in lay["blocks"] if not b["removed"]]
    self.assertLessEqual(max(removed), min(kept))

  def test_resnet50v2_chained_blocks_and_onnx(self):
    fixture = keras_zoo.Fixture("ResNet50V2", self.tmp)
    out = os.path.join(self.tmp, "r50v2_layers.pb")
    doc = pipeline.prune(fixture.pb, out, pipeline.Options(ratio=0.9, mode="layer"))
    self.assertTrue(doc["verify"]["passed"])
    self.assertLessEqual(doc["verify"]["max_rel_diff"], 1e-5)
    # 16 blocks: 4 with a projection and 3 with a strided (pooled) shortcut stay.
    lay = doc["layers"]
    self.assertEqual((lay["removable_blocks"], lay["removable_layers"], lay["removed"]),
                     (9, 1, 9))
    # Neighbours removed together: a block whose shortcut is a removed block's sum.
    adds = {b["node"]: b for b in lay["blocks"] if b["kind"] == "block"}
    self.assertTrue(any(b["removed"] and adds.get(_producer_add(b["shortcut"]), {}).get("removed")
                        for b in lay["blocks"]), lay["blocks"])
    import tf2onnx  # pylint: disable=g-import-not-at-top
    src = os.path.join(self.tmp, "r50v2.onnx")
    tf2onnx.convert.from_graph_def(fixture.graph_def(), input_names=["input:0"],
                                   output_names=["Identity:0"], opset=17, output_path=src)
    out = os.path.join(self.tmp, "r50v2_layers.onnx")
    doc_onnx = pipeline.prune(src, out, pipeline.Options(ratio=0.9, mode="layer"))
    self.assertTrue(doc_onnx["verify"]["passed"])
    self.assertEqual(doc_onnx["layers"]["removable_blocks"], 9)
    # tf2onnx folds the explicit padding before each 3x3 convolution into the
    # convolution, so in ONNX the 3x3 layers of the projection blocks keep their
    # input's shape and are removable too (in the GraphDef their input is padded).
    self.assertGreater(doc_onnx["layers"]["removable_layers"], 1)
    pruned = onnx.load(out)
    onnx.checker.check_model(pruned, full_check=True)
    self.assertLess(sum(n.op_type == "Conv" for n in pruned.graph.node),
                    sum(n.op_type == "Conv" for n in onnx.load(src).graph.node))
    # Nothing the removed branches read is left behind.
    read = {t for n in pruned.graph.node for t in n.input}
    self.assertEqual([t.name for t in pruned.graph.initializer if t.name not in read], [])

  def test_zero_branch_goes_first_and_changes_nothing(self):
    src = os.path.join(self.tmp, "res.onnx")
    onnx.save_model(_residual_net(), src)
    out = os.path.join(self.tmp, "res_layers.onnx")
    doc = pipeline.prune(src, out, pipeline.Options(ratio=0.5, mode="layer"))
    lay = doc["layers"]
    self.assertEqual((lay["removable"], lay["removed"]), (2, 1))
    self.assertEqual([(b["kind"], b["score"]) for b in lay["blocks"] if b["removed"]],
                     [("block", 0.0)])
    self.assertEqual(doc["verify"]["effect_max_abs"], 0.0)
    x = np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(np.float32)
    run = lambda p: onnxruntime.InferenceSession(p, providers=["CPUExecutionProvider"]).run(
        None, {"x": x})[0]
    np.testing.assert_array_equal(run(out), run(src))
    self.assertEqual(sum(n.op_type == "Add" for n in onnx.load(out).graph.node), 1)

  def test_distillation_after_removing_blocks(self):
    # The LayerPrune workflow in one command: blocks removed, checked, then the
    # smaller model distilled from the original (unlabelled inputs).
    fixture = keras_zoo.Fixture("ResNet50", self.tmp)
    data = os.path.join(self.tmp, "unlabelled.npz")
    np.savez(data, x=keras_zoo.sample_input("ResNet50", batch=96, seed=5))
    from graph_prune.recover import options as recover_options  # pylint: disable=g-import-not-at-top
    from graph_prune.recover import recover  # pylint: disable=g-import-not-at-top
    step = recover.Recovery(recover_options.Options(
        method="distill", data=data, train_steps=6, batch_size=8, holdout_samples=32,
        log_every=3))
    out = os.path.join(self.tmp, "r50_distilled.pb")
    doc = pipeline.prune(fixture.pb, out, pipeline.Options(ratio=0.5, mode="layer",
                                                           recover=step))
    self.assertTrue(doc["verify"]["passed"])
    rec = doc["recovery"]
    self.assertEqual((rec["method"], rec["train_steps"]), ("distill", 6))
    self.assertIn("holdout_agreement_after", rec)
    self.assertEqual(doc["layers"]["removed"], 8)
    runner = tf_model.Runner(tf_model.load(out))
    self.assertEqual(runner([keras_zoo.sample_input("ResNet50")])[0].shape,
                     (2, keras_zoo.NUM_CLASSES))
    runner.close()
    with self.assertRaisesRegex(errors.UsageError, "--recover=bn_recalibrate with it"):
      pipeline.prune(fixture.pb, os.path.join(self.tmp, "x.pb"), pipeline.Options(
          mode="layer", recover=recover.Recovery(recover_options.Options(
              method="bn_recalibrate", data=data))))

  def test_refusals(self):
    src = os.path.join(self.tmp, "res.onnx")
    onnx.save_model(_residual_net(), src)
    out = os.path.join(self.tmp, "o.onnx")
    with self.assertRaisesRegex(errors.UsageError, "unknown --mode 'block'"):
      pipeline.prune(src, out, pipeline.Options(mode="block"))
    with self.assertRaisesRegex(errors.UsageError, "--allocation=global with it is not built"):
      pipeline.prune(src, out, pipeline.Options(mode="layer", target_flops=0.5,
                                                allocation="global"))
    with self.assertRaisesRegex(errors.NothingToPruneError, "removes none of the 2"):
      pipeline.prune(src, out, pipeline.Options(mode="layer", ratio=0.1))
    with self.assertRaisesRegex(errors.UsageError, "--target_flops=0.05 cannot be met: removing "
                                "all 2 removable layers and blocks keeps 0.086"):
      pipeline.prune(src, out, pipeline.Options(mode="layer", target_flops=0.05))
    # Nothing removable: every layer changes the width or the size.
    n = onnx_net.Net()
    h = n.op("Relu", [n.conv(n.op("Relu", [n.conv("x", 3, 8)]), 8, 16, stride=2)])
    plain = os.path.join(self.tmp, "plain.onnx")
    onnx.save_model(n.model(n.op("GlobalAveragePool", [h]), [16, 1, 1]), plain)
    with self.assertRaisesRegex(errors.NothingToPruneError, "nothing removable"):
      pipeline.prune(plain, out, pipeline.Options(mode="layer"))
    self.assertFalse(os.path.exists(out))


def _plain_net(signed_input=False):
  """A plain chain (x: 8x8): conv 3->8, relu, then the candidates: conv 8->8 + batch
  norm + relu, depthwise 8->8 + relu, dense 8->8 + relu (after pooling); and what
  is not one: a strided conv 8->8 and the dense layer to 4 classes. With
  signed_input the first layer has no relu, so the 8->8 conv's relu must stay."""
  n = onnx_net.Net(seed=3)
  h = n.conv("x", 3, 8)
  if not signed_input:
    h = n.op("Relu", [h])
  h = n.op("Relu", [n.bn(n.conv(h, 8, 8, bias=False), 8)])
  h = n.op("Relu", [n.conv(h, 8, 8, group=8)])
  h = n.op("Relu", [n.conv(h, 8, 8, stride=2)])
  g = n.op("Flatten", [n.op("GlobalAveragePool", [h])])
  g = n.op("Relu", [n.dense(g, (8, 8))])
  return n.model(n.dense(g, (8, 4)), [4], size=8)


class PlainLayerTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.tmp = self.create_tempdir().full_path

  def _run(self, path, x):
    return onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"]).run(
        None, {"x": x})[0]

  def test_layers_become_the_identity_exactly(self):
    src = os.path.join(self.tmp, "plain.onnx")
    onnx.save_model(_plain_net(), src)
    out = os.path.join(self.tmp, "plain_layers.onnx")
    doc = pipeline.prune(src, out, pipeline.Options(ratio=0.99, mode="layer"))
    lay = doc["layers"]
    self.assertEqual((lay["removable_blocks"], lay["removable_layers"], lay["removed"]),
                     (0, 3, 3))
    self.assertTrue(lay["needs_recovery"])
    # The oracle: the original with those weights the identity kernel (the batch
    # norm mean 0, variance 1 - epsilon) equals the pruned model.
    self.assertTrue(doc["verify"]["passed"])
    self.assertLessEqual(doc["verify"]["max_rel_diff"], 1e-5)
    self.assertGreater(doc["verify"]["effect_max_rel"], 1e-2)
    pruned = onnx.load(out)
    onnx.checker.check_model(pruned, full_check=True)
    ops = [n.op_type for n in pruned.graph.node]
    self.assertEqual((ops.count("Conv"), ops.count("Gemm"), ops.count("BatchNormalization"),
                      ops.count("Relu")), (2, 1, 0, 2))
    x = np.random.default_rng(1).standard_normal((3, 3, 8, 8)).astype(np.float32)
    self.assertEqual(self._run(out, x).shape, (3, 4))
    # Half of them: the least score first.
    doc = pipeline.prune(src, os.path.join(self.tmp, "half.onnx"),
                         pipeline.Options(ratio=0.5, mode="layer"))
    scores = [(b["score"], b["removed"]) for b in doc["layers"]["blocks"]]
    self.assertEqual([r for _, r in scores], [True, True, False])   # round(1.5)
    self.assertEqual(scores, sorted(scores))

  def test_relu_stays_where_the_input_can_be_negative(self):
    src = os.path.join(self.tmp, "signed.onnx")
    onnx.save_model(_plain_net(signed_input=True), src)
    out = os.path.join(self.tmp, "signed_layers.onnx")
    doc = pipeline.prune(src, out, pipeline.Options(ratio=0.99, mode="layer"))
    self.assertTrue(doc["verify"]["passed"])
    nodes = {b["node"]: b for b in doc["layers"]["blocks"]}
    # The 8->8 conv's chain ends at its batch norm; its relu now reads the signed
    # input (the depthwise layer's input is that relu's output, so its own goes).
    self.assertIn("batchnormalization1", nodes)
    pruned = onnx.load(out)
    relus = [n for n in pruned.graph.node if n.op_type == "Relu"]
    self.assertEqual([n.input[0] for n in relus][:1], ["conv1"])

  def test_budget_removes_the_fewest_that_meet_it(self):
    src = os.path.join(self.tmp, "plain.onnx")
    onnx.save_model(_plain_net(), src)
    out = os.path.join(self.tmp, "budget.onnx")
    doc = pipeline.prune(src, out, pipeline.Options(mode="layer", target_flops=0.75))
    b, lay = doc["budget"], doc["layers"]
    self.assertLessEqual(b["flops_kept"], 0.75)
    self.assertTrue(doc["verify"]["passed"])
    # One fewer does not meet it.
    fewer = pipeline.prune(src, os.path.join(self.tmp, "fewer.onnx"), pipeline.Options(
        mode="layer", ratio=(lay["removed"] - 1) / lay["removable"]))
    self.assertEqual(fewer["layers"]["removed"], lay["removed"] - 1)
    self.assertGreater(fewer["flops_after"] / fewer["flops_before"], 0.75)

  def test_vgg16_plain_layers_graphdef(self):
    fixture = keras_zoo.Fixture("VGG16", self.tmp)
    out = os.path.join(self.tmp, "vgg_layers.pb")
    doc = pipeline.prune(fixture.pb, out, pipeline.Options(ratio=0.5, mode="layer"))
    lay = doc["layers"]
    # conv1_2, conv2_2, conv3_2-3, conv4_2-3, conv5_1-3 (after a max pool of a
    # ReLU: its input is non-negative too) and fc2.
    self.assertEqual((lay["removable_blocks"], lay["removable_layers"], lay["removed"]),
                     (0, 10, 5))
    self.assertTrue(any("block5_conv1" in b["node"] for b in lay["blocks"]))
    self.assertTrue(doc["verify"]["passed"])
    self.assertLessEqual(doc["verify"]["max_rel_diff"], 1e-5)
    before, after = tf_model.load(fixture.pb).graph_def, tf_model.load(out).graph_def
    self.assertEqual(sum(n.op in ("Conv2D", "MatMul") for n in before.node)
                     - sum(n.op in ("Conv2D", "MatMul") for n in after.node), 5)


if __name__ == "__main__":
  absltest.main()
