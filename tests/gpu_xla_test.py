"""benchmarks/gpu_xla, gpu_xla_prepare and onnx_jax: stripping weights for the trip to a GPU and refilling them there.

The evaluator itself needs JAX, which is not in third_party/requirements.txt:
its comparison with ONNX Runtime runs only where JAX is installed and is
skipped, saying so, elsewhere.
"""

import importlib.util
import os

import numpy as np
import onnx
from onnx import helper
from onnx import numpy_helper
from onnx import TensorProto
from absl.testing import absltest

from benchmarks import gpu_xla
from benchmarks import gpu_xla_prepare
from benchmarks import onnx_jax
from tests import onnx_net


def _small_cnn(op="Relu"):
  """NHWC input -> Transpose -> Conv 3x3 -> op -> MaxPool -> Conv -> GAP -> Flatten -> Gemm -> Softmax."""
  rng = np.random.default_rng(0)
  inits = {
      "w1": rng.standard_normal((16, 3, 3, 3)).astype(np.float32) * 0.3,
      "b1": rng.standard_normal(16).astype(np.float32) * 0.1,
      "w2": rng.standard_normal((8, 16, 3, 3)).astype(np.float32) * 0.1,
      "b2": rng.standard_normal(8).astype(np.float32) * 0.1,
      "fc": rng.standard_normal((8, 4)).astype(np.float32),
      "fcb": rng.standard_normal(4).astype(np.float32),
  }
  nodes = [
      helper.make_node("Transpose", ["x"], ["t"], perm=[0, 3, 1, 2]),
      helper.make_node("Conv", ["t", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
      helper.make_node(op, ["c1"], ["r1"]),
      helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
      helper.make_node("Conv", ["p1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2]),
      helper.make_node("GlobalAveragePool", ["c2"], ["g"]),
      helper.make_node("Flatten", ["g"], ["f"]),
      helper.make_node("Gemm", ["f", "fc", "fcb"], ["logits"]),
      helper.make_node("Softmax", ["logits"], ["y"], axis=-1),
  ]
  graph = helper.make_graph(
      nodes, "small_cnn",
      [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8, 8, 3])],
      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
      [numpy_helper.from_array(v, k) for k, v in inits.items()])
  model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
  onnx.checker.check_model(model, full_check=True)
  return model, inits


class GpuXlaTest(absltest.TestCase):

  def _stripped(self, model):
    path = os.path.join(self.create_tempdir().full_path, "m.onnx")
    removed = gpu_xla_prepare._strip_model(model, 1024)  # pylint: disable=protected-access
    onnx.save(model, path)
    return path, removed

  def test_strip_keeps_shapes_and_small_tensors(self):
    model, inits = _small_cnn()
    path, removed = self._stripped(model)
    # w1 (1,728 bytes) and w2 (4,608 bytes) lose their values; the rest is under 1 KiB.
    self.assertEqual(removed, inits["w1"].size + inits["w2"].size)
    stored = {t.name: t for t in onnx.load(path, load_external_data=False).graph.initializer}
    for name in ("w1", "w2"):
      self.assertEqual(stored[name].data_location, TensorProto.EXTERNAL)
      self.assertEqual(list(stored[name].dims), list(inits[name].shape))
      self.assertEqual(stored[name].raw_data, b"")
    for name in ("b1", "b2", "fc", "fcb"):
      np.testing.assert_array_equal(numpy_helper.to_array(stored[name]), inits[name])
    self.assertLess(os.path.getsize(path), 1024)

  def test_load_refills_seeded_he_normal(self):
    model, inits = _small_cnn()
    path, _ = self._stripped(model)
    loaded, refilled = onnx_jax.load(path, seed=3)
    again, _ = onnx_jax.load(path, seed=3)
    self.assertEqual(refilled, inits["w1"].size + inits["w2"].size)
    arrays = {t.name: numpy_helper.to_array(t) for t in loaded.graph.initializer}
    for t in again.graph.initializer:  # deterministic
      np.testing.assert_array_equal(numpy_helper.to_array(t), arrays[t.name])
    for name, fan_in in (("w1", 27), ("w2", 144)):
      self.assertEqual(arrays[name].shape, inits[name].shape)
      self.assertEqual(arrays[name].dtype, np.float32)
      self.assertAlmostEqual(float(arrays[name].std()), np.sqrt(2 / fan_in),
                             delta=0.15 * np.sqrt(2 / fan_in))
    np.testing.assert_array_equal(arrays["fc"], inits["fc"])
    onnx.checker.check_model(loaded, full_check=True)

  def test_refuses_unknown_op_and_foreign_external_data(self):
    model, _ = _small_cnn(op="Elu")
    with self.assertRaisesRegex(onnx_jax.UnsupportedError, "Elu"):
      onnx_jax.Evaluator(model)
    model, _ = _small_cnn()
    path, _ = self._stripped(model)
    model = onnx.load(path, load_external_data=False)
    model.graph.initializer[0].external_data[0].value = "weights.bin"
    onnx.save(model, path)
    with self.assertRaisesRegex(onnx_jax.UnsupportedError, "weights.bin"):
      onnx_jax.load(path, seed=0)

  def test_prepare_layer_mode_and_filter_pruning_to_its_flops(self):
    """--layer_ratios: a layer-mode variant and uniform filter pruning to its FLOPs,
    both verified, stripped and in the manifest, and neither is the primary ratio."""
    n = onnx_net.Net(seed=3)
    x = n.op("Relu", [n.conv("x", 3, 32)])
    for _ in range(3):
      x = n.op("Relu", [n.op("Add", [x, n.conv(n.op("Relu", [n.conv(x, 32, 32)]), 32, 32)])])
    model = n.model(n.dense(n.op("Flatten", [n.op("GlobalAveragePool", [x])]), (32, 4)), [4],
                    size=16)
    work, out = self.create_tempdir().full_path, self.create_tempdir().full_path
    onnx.save(model, os.path.join(work, "Tiny_16.onnx"))
    manifest = gpu_xla_prepare.prepare(out, ["Tiny"], 16, [0.5], "l1", ["1"], 1024, work,
                                       layer_ratios=[0.5])
    pruned = manifest["models"]["Tiny"]["pruned"]
    self.assertEqual(sorted(pruned), ["0.5/1", "filter_at_layer0.5/1", "layer0.5"])
    layer, filt = pruned["layer0.5"], pruned["filter_at_layer0.5/1"]
    self.assertEqual((layer["mode"], layer["removed"], layer["removable"]), ("layer", 2, 3))
    self.assertFalse(layer["needs_recovery"])  # residual blocks: exact
    self.assertLess(layer["flops_after"], 0.5 * layer["flops_before"])
    # The filter variant keeps at most the layer variant's FLOPs, and not far below.
    self.assertLessEqual(filt["flops_after"], layer["flops_after"])
    self.assertGreater(filt["flops_after"], 0.8 * layer["flops_after"])
    self.assertEqual(filt["mode"], "filter_at_layer")
    for p in pruned.values():
      self.assertLess(p["verify_max_rel_diff"], 1e-4)
      self.assertTrue(os.path.exists(os.path.join(out, p["file"])))
    convs = lambda f: sum(o.op_type == "Conv" for o in onnx.load(
        os.path.join(out, f), load_external_data=False).graph.node)
    self.assertEqual((convs(layer["file"]), convs(filt["file"])), (3, 7))

  def test_evaluator_matches_onnxruntime(self):
    if importlib.util.find_spec("jax") is None:
      self.skipTest("JAX is not installed (not in third_party/requirements.txt)")
    model, _ = _small_cnn()
    x = np.random.default_rng(1).uniform(-1, 1, (2, 8, 8, 3)).astype(np.float32)
    diff = gpu_xla.check_against_ort(model, "highest", x)
    self.assertTrue(diff["finite"])
    self.assertLess(diff["logits"], 1e-5)
    self.assertLess(diff["output"], 1e-5)


if __name__ == "__main__":
  absltest.main()
