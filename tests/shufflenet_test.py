"""Acceptance: ShuffleNet prunes at 0.5 with at least 40 % of the parameters
removed and the oracle passing, in two forms:

- ShuffleNet V1 (grouped 1x1 convolutions, channel shuffles, depthwise
  convolutions, residual sums, concat) as the onnx package ships it in its
  backend test data (light_shufflenet.onnx, opset 9, IR 3, weights left out as
  ConstantOfShape nodes);
- ShuffleNet V2 exported from torch (tests/data/export_torch_shufflenet.py:
  channel split by torch.chunk, whose Slice bounds and shuffle reshapes are
  computed from Shape at run time), weights left out as external data.

Both get seeded random weights, with non-trivial biases and batch-norm statistics.
"""

import os

import numpy as np
import onnx
import onnxruntime
from absl.testing import absltest
from onnx import helper

from graph_prune import pipeline
from tests import onnx_net

class ShuffleNetTest(absltest.TestCase):

  def test_torch_shufflenet_v2(self):
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data",
                        "torch_shufflenet_v2.onnx")
    model = onnx_net.filled_external(path)
    tmp = self.create_tempdir().full_path
    src, out = os.path.join(tmp, "shufflenet_v2.onnx"), os.path.join(tmp, "pruned.onnx")
    onnx.save_model(model, src)
    doc = pipeline.prune(src, out, pipeline.Options(ratio=0.5))
    self.assertGreaterEqual(1 - doc["params_after"] / doc["params_before"], 0.40)
    self.assertTrue(doc["verify"]["passed"])
    self.assertLessEqual(doc["verify"]["max_rel_diff"], 1e-5)
    self.assertGreater(doc["verify"]["effect_max_rel"], 1e-3)
    # Every shuffle and every chunk is followed: only the classifier is left whole.
    self.assertEqual([s["reasons"][0] for s in doc["skipped"]
                      if not s["reasons"][0].startswith("nothing removed")],
                     ["channels reach graph output 'logits'"])
    x = np.random.default_rng(1).standard_normal((2, 3, 224, 224)).astype(np.float32)
    y = onnxruntime.InferenceSession(out, providers=["CPUExecutionProvider"]).run(
        None, {"input": x})[0]
    self.assertEqual(y.shape, (2, 1000))

  def test_onnx_zoo_shufflenet_v1(self):
    model = onnx_net.filled_shufflenet()
    tmp = self.create_tempdir().full_path
    src, out = os.path.join(tmp, "shufflenet.onnx"), os.path.join(tmp, "pruned.onnx")
    onnx.save_model(model, src)
    doc = pipeline.prune(src, out, pipeline.Options(ratio=0.5))
    removed = 1 - doc["params_after"] / doc["params_before"]
    self.assertGreaterEqual(removed, 0.40)
    self.assertTrue(doc["verify"]["passed"])
    self.assertLessEqual(doc["verify"]["max_rel_diff"], 1e-5)
    # Pruning changed the logits, so the check was not vacuous.
    self.assertGreater(doc["verify"]["effect_max_rel"], 1e-3)
    pruned = onnx.load(out)
    onnx.checker.check_model(pruned, full_check=True)
    # Grouped convolutions keep their group count; the shuffles' reshapes follow.
    groups = lambda m: sorted(helper.get_attribute_value(a) for n in m.graph.node
                              for a in n.attribute if a.name == "group" and
                              helper.get_attribute_value(a) <= 4)
    self.assertEqual(groups(pruned), groups(model))
    x = np.random.default_rng(1).standard_normal((1, 3, 224, 224)).astype(np.float32)
    y = onnxruntime.InferenceSession(out, providers=["CPUExecutionProvider"]).run(
        None, {"gpu_0/data_0": x})[0]
    self.assertEqual(y.shape, (1, 1000))


if __name__ == "__main__":
  absltest.main()
