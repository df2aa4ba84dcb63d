"""--mode=layer: whole residual blocks removed (analysis/blocks.py), checked by the
oracle against the original with the removed branches' last layers zeroed.

ResNet50 has 16 bottleneck blocks, 4 of them with a projection shortcut (not
removable: the shapes differ); ResNet50V2's blocks follow each other without an
activation between, so removing neighbours chains their shortcuts.
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
    self.assertEqual((lay["removable"], lay["removed"]), (12, 6))
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
    self.assertEqual(_convs(before) - _convs(after), 6 * 3)
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
    self.assertEqual((lay["removable"], lay["removed"]), (9, 8))
    # Neighbours removed together: a block whose shortcut is a removed block's sum.
    adds = {b["add"]: b for b in lay["blocks"]}
    self.assertTrue(any(b["removed"] and adds.get(_producer_add(b["shortcut"]), {}).get("removed")
                        for b in lay["blocks"]), lay["blocks"])
    import tf2onnx  # pylint: disable=g-import-not-at-top
    src = os.path.join(self.tmp, "r50v2.onnx")
    tf2onnx.convert.from_graph_def(fixture.graph_def(), input_names=["input:0"],
                                   output_names=["Identity:0"], opset=17, output_path=src)
    out = os.path.join(self.tmp, "r50v2_layers.onnx")
    doc_onnx = pipeline.prune(src, out, pipeline.Options(ratio=0.9, mode="layer"))
    self.assertTrue(doc_onnx["verify"]["passed"])
    self.assertEqual(doc_onnx["layers"]["removed"], doc["layers"]["removed"])
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
    self.assertEqual([b["score"] for b in lay["blocks"] if b["removed"]], [0.0])
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
    self.assertEqual(doc["layers"]["removed"], 6)
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
    with self.assertRaisesRegex(errors.UsageError, "a budget with it is not built yet"):
      pipeline.prune(src, out, pipeline.Options(mode="layer", target_flops=0.5))
    with self.assertRaisesRegex(errors.NothingToPruneError, "removes none of the 2"):
      pipeline.prune(src, out, pipeline.Options(mode="layer", ratio=0.1))
    n = onnx_net.Net()
    h = n.op("Relu", [n.conv(n.op("Relu", [n.conv("x", 3, 8)]), 8, 8)])
    plain = os.path.join(self.tmp, "plain.onnx")
    onnx.save_model(n.model(n.op("GlobalAveragePool", [h]), [8, 1, 1]), plain)
    with self.assertRaisesRegex(errors.NothingToPruneError, "no removable residual block"):
      pipeline.prune(plain, out, pipeline.Options(mode="layer"))
    self.assertFalse(os.path.exists(out))


if __name__ == "__main__":
  absltest.main()
