"""Acceptance: ShuffleNet (grouped 1x1 convolutions, channel shuffles, depthwise
convolutions, residual sums, concat) prunes at 0.5 with at least 40 % of the
parameters removed and the oracle passing.

The topology is the one the onnx package ships in its backend test data
(light_shufflenet.onnx, opset 9, IR 3, weights left out as ConstantOfShape
nodes); the weights are filled with seeded random values, with non-trivial
biases and batch-norm statistics.
"""

import os

import numpy as np
import onnx
import onnxruntime
from absl.testing import absltest
from onnx import helper
from onnx import numpy_helper

from graph_prune import pipeline

_PATH = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light",
                     "light_shufflenet.onnx")


def _value(name, shape, rng):
  if "_bn_s" in name or "_bn_riv" in name:        # batch-norm scale, variance: positive
    return rng.uniform(0.5, 1.5, shape)
  if "_bn_" in name or name.endswith("_b_0"):      # batch-norm shift, mean; biases
    return rng.normal(0.0, 0.2, shape)
  fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
  return rng.normal(0.0, np.sqrt(2.0 / fan_in), shape)


def filled_shufflenet(seed=0) -> onnx.ModelProto:
  """light_shufflenet.onnx with every weight a seeded random initializer."""
  m = onnx.load(_PATH, load_external_data=False)
  rng = np.random.default_rng(seed)
  inits = {t.name: t for t in m.graph.initializer}
  nodes, weights = [], []
  for n in m.graph.node:
    if n.op_type == "ConstantOfShape":
      shape = numpy_helper.to_array(inits[n.input[0]])
      weights.append(numpy_helper.from_array(
          _value(n.output[0], shape, rng).astype(np.float32), n.output[0]))
    else:
      nodes.append(n)
  read = {t for n in nodes for t in n.input}
  kept = []
  for t in m.graph.initializer:
    if t.name not in read:
      continue
    value = numpy_helper.to_array(t)
    if value.dtype == np.float32:
      t = numpy_helper.from_array(_value(t.name, value.shape, rng).astype(np.float32), t.name)
    kept.append(t)
  del m.graph.node[:]
  m.graph.node.extend(nodes)
  del m.graph.initializer[:]
  m.graph.initializer.extend(kept + weights)
  names = {t.name for t in m.graph.initializer}
  data = [i for i in m.graph.input if i.name not in inits]
  inputs = data + [i for i in m.graph.input if i.name in names]   # IR 3: initializers are inputs
  inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in weights]
  del m.graph.input[:]
  m.graph.input.extend(inputs)
  onnx.checker.check_model(m)
  return m


class ShuffleNetTest(absltest.TestCase):

  def test_prunes_at_half_with_the_oracle_passing(self):
    model = filled_shufflenet()
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
