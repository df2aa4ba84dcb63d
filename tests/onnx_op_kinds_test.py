"""The ONNX op kinds users ask for most, each pruned through (or refused with a
true reason): grouped and transposed grouped convolution, Split and channel
Slice (torch chunk), Gather with constant indices, DepthToSpace/SpaceToDepth,
GroupNormalization (and its decomposed torch form), InstanceNormalization,
Einsum forms of dense layers and 1x1 convolutions, Gemm with transA, constant
Pad of the channel axis, spatial attention, a QDQ model."""

import os

import numpy as np
import onnx
import onnxruntime
from absl.testing import absltest
from absl.testing import parameterized
from onnx import helper
from onnx import numpy_helper

from graph_prune import errors
from graph_prune import pipeline
from tests import onnx_net


def _ints(n, values):
  return n.op("Constant", [], value=numpy_helper.from_array(np.array(values, np.int64)))


def _head(n, h, cin, cout=4):
  """1x1 convolution reading h's cin channels, global pooling: h's group ends here."""
  return n.op("GlobalAveragePool", [n.op("Conv", [h, n.weight((cout, cin, 1, 1))])])


class OpKindsTest(parameterized.TestCase):

  def _prune(self, model, **kw):
    tmp = self.create_tempdir().full_path
    src, out = os.path.join(tmp, "in.onnx"), os.path.join(tmp, "out.onnx")
    onnx.save_model(model, src)
    doc = pipeline.prune(src, out, pipeline.Options(**kw))
    self.assertTrue(doc["verify"]["passed"], doc["verify"])
    self.assertLessEqual(doc["verify"]["max_rel_diff"], 1e-5)
    self.assertGreater(doc["verify"]["effect_max_rel"], 0.0)   # something really changed
    pruned = onnx.load(out)
    onnx.checker.check_model(pruned, full_check=True)
    x = np.random.default_rng(5).standard_normal((2, 3, 8, 8)).astype(np.float32)
    run = lambda p: onnxruntime.InferenceSession(p, providers=["CPUExecutionProvider"]).run(
        None, {"x": x})[0]
    self.assertEqual(run(out).shape, run(src).shape)
    weights = {t.name: tuple(t.dims) for t in pruned.graph.initializer}
    return doc, weights, pruned

  def test_grouped_conv_transpose(self):
    n = onnx_net.Net()
    h = n.op("Relu", [n.conv("x", 3, 8)])
    h = n.op("ConvTranspose", [h, n.weight((8, 3, 2, 2), name="ct_w"), n.weight((6,))],
             strides=[2, 2], group=2)                              # 2 groups: 4 in, 3 out each
    out = _head(n, n.op("Relu", [h]), 6)
    doc, w, _ = self._prune(n.model(out, [4, 1, 1]))
    self.assertEqual(w["conv1_w"], (4, 3, 3, 3))                   # 4 units of 2 -> 2 units
    self.assertEqual(w["ct_w"], (4, 2, 2, 2))                      # each group: 2 in, 2 out
    self.assertEqual(doc["groups_pruned"], 2)

  @parameterized.named_parameters(("attribute_12", 12), ("input_13", 13), ("equal_18", 18))
  def test_split_on_channels(self, opset):
    n = onnx_net.Net()
    h = n.op("Relu", [n.conv("x", 3, 8)])
    outs = ["s1", "s2"]
    if opset == 12:
      n.nodes.append(helper.make_node("Split", [h], outs, axis=1, split=[2, 6]))
    elif opset == 13:
      n.nodes.append(helper.make_node("Split", [h, _ints(n, [2, 6])], outs, axis=1))
    else:
      n.nodes.append(helper.make_node("Split", [h], outs, axis=1, num_outputs=2))
    a = _head(n, "s1", 2 if opset != 18 else 4)
    b = _head(n, "s2", 6 if opset != 18 else 4)
    out = n.op("Add", [a, b])
    doc, w, pruned = self._prune(n.model(out, [4, 1, 1], opset=opset))
    self.assertEqual(w["conv1_w"], (4, 3, 3, 3))
    parts = sorted(w[k][1] for k in w if k not in ("conv1_w", "conv1_b") and len(w[k]) == 4)
    self.assertEqual(sum(parts), 4)
    self.assertTrue(all(p >= 1 for p in parts))

  def test_slice_chunks_of_the_channels(self):
    # torch.chunk(h, 2, dim=1) exports as two Slices of the channel axis.
    n = onnx_net.Net()
    h = n.op("Relu", [n.conv("x", 3, 8)])
    first = n.op("Slice", [h, _ints(n, [0]), _ints(n, [4]), _ints(n, [1])])
    second = n.op("Slice", [h, _ints(n, [4]), _ints(n, [2 ** 62]), _ints(n, [1])])
    out = n.op("Add", [_head(n, first, 4), _head(n, second, 4)])
    doc, w, pruned = self._prune(n.model(out, [4, 1, 1]))
    self.assertEqual(w["conv1_w"], (4, 3, 3, 3))
    widths = [w["w1"][1], w["w2"][1]]          # the heads of the two chunks
    self.assertEqual(sum(widths), 4)
    self.assertTrue(all(k >= 1 for k in widths), widths)
    # The second slice starts where the first one's kept channels end.
    consts = {x.output[0]: numpy_helper.to_array(x.attribute[0].t).tolist()
              for x in pruned.graph.node if x.op_type == "Constant"}
    slices = [x for x in pruned.graph.node if x.op_type == "Slice"]
    self.assertEqual([consts[s.input[1]] for s in slices], [[0], [widths[0]]])
    self.assertEqual(consts[slices[0].input[2]], [widths[0]])

  def test_gather_with_constant_indices(self):
    n = onnx_net.Net()
    h = n.op("Relu", [n.conv("x", 3, 8)])
    g = n.op("Gather", [h, _ints(n, [6, 1, 3, 1])], axis=1)       # channel 1 twice
    out = _head(n, g, 4)
    doc, w, _ = self._prune(n.model(out, [4, 1, 1]))
    self.assertEqual(w["conv1_w"], (4, 3, 3, 3))

  @parameterized.named_parameters(("dcr", "DCR"), ("crd", "CRD"))
  def test_depth_to_space(self, mode):
    n = onnx_net.Net()
    h = n.op("Relu", [n.conv("x", 3, 16)])
    h = n.op("DepthToSpace", [h], blocksize=2, mode=mode)           # 16 -> 4 channels
    out = _head(n, h, 4)
    doc, w, _ = self._prune(n.model(out, [4, 1, 1]))
    self.assertEqual(w["conv1_w"], (8, 3, 3, 3))                     # 2 of 4 output channels
    self.assertEqual(w["w1"], (4, 2, 1, 1))

  def test_space_to_depth(self):
    n = onnx_net.Net()
    h = n.op("Relu", [n.conv("x", 3, 4)])
    h = n.op("SpaceToDepth", [h], blocksize=2)                     # 4 -> 16 channels
    out = _head(n, h, 16)
    doc, w, _ = self._prune(n.model(out, [4, 1, 1]))
    self.assertEqual(w["conv1_w"], (2, 3, 3, 3))
    self.assertEqual(w["w1"], (4, 8, 1, 1))

  def test_group_normalization(self):
    # (GroupNormalization-18, with parameters per group, fails onnx.checker at
    # opsets 18-20: it is deprecated there.)
    n = onnx_net.Net()
    h = n.conv("x", 3, 8)
    h = n.op("GroupNormalization", [h, n.weight((8,), 1, positive=True), n.weight((8,))],
             num_groups=4)
    out = _head(n, n.op("Relu", [h]), 8)
    doc, w, pruned = self._prune(n.model(out, [4, 1, 1], opset=21, ir_version=10))
    self.assertEqual(w["conv1_w"], (4, 3, 3, 3))                     # 2 whole groups of 2
    norm = next(x for x in pruned.graph.node if x.op_type == "GroupNormalization")
    self.assertEqual(helper.get_attribute_value(norm.attribute[0]), 2)

  def test_decomposed_group_norm(self):
    # torch's GroupNorm export before opset 18: Reshape [N, G, -1] ->
    # InstanceNormalization over the groups -> Reshape back -> per-channel Mul, Add.
    n = onnx_net.Net()
    h = n.conv("x", 3, 8)
    g = n.op("Reshape", [h, _ints(n, [0, 4, -1])])
    g = n.op("InstanceNormalization", [g, n.weight((4,), 1, positive=True), n.weight((4,))])
    h = n.op("Reshape", [g, _ints(n, [0, 8, 8, 8])])
    h = n.op("Add", [n.op("Mul", [h, n.weight((8, 1, 1), 1, positive=True)]),
                     n.weight((8, 1, 1))])
    out = _head(n, n.op("Relu", [h]), 8)
    doc, w, _ = self._prune(n.model(out, [4, 1, 1], opset=13))
    self.assertEqual(w["conv1_w"], (4, 3, 3, 3))

  def test_instance_normalization(self):
    n = onnx_net.Net()
    h = n.conv("x", 3, 8)
    h = n.op("InstanceNormalization", [h, n.weight((8,), 1, positive=True), n.weight((8,))])
    out = _head(n, n.op("Relu", [h]), 8)
    doc, w, _ = self._prune(n.model(out, [4, 1, 1]))
    self.assertEqual(w["conv1_w"], (4, 3, 3, 3))

  def test_einsum_dense_and_1x1_convolution(self):
    n = onnx_net.Net()
    h = n.op("Relu", [n.conv("x", 3, 8)])
    h = n.op("Einsum", [h, n.weight((8, 6), name="e1_w")], equation="bchw,co->bohw")
    h = n.op("Relu", [h])
    v = n.op("Flatten", [n.op("GlobalAveragePool", [h])])             # [N, 6]
    v = n.op("Relu", [n.op("Einsum", [v, n.weight((6, 5), name="e2_w")],
                           equation="...i,io->...o")])
    out = n.op("Gemm", [v, n.weight((5, 3))])
    doc, w, _ = self._prune(n.model(out, [3]))
    self.assertEqual(w["e1_w"], (4, 3))
    self.assertEqual(w["e2_w"], (3, 3))
    self.assertEqual(doc["groups_pruned"], 3)

  def test_gemm_with_trans_a(self):
    n = onnx_net.Net()
    h = n.op("Relu", [n.conv("x", 3, 8)])
    v = n.op("Flatten", [n.op("GlobalAveragePool", [h])])             # [N, 8]
    t = n.op("Transpose", [v], perm=[1, 0])                          # [8, N]
    out = n.op("Gemm", [t, n.weight((8, 5), name="g_w")], transA=1)
    doc, w, _ = self._prune(n.model(out, [5]))
    self.assertEqual(w["g_w"], (4, 5))

  def test_constant_pad_of_the_channel_axis(self):
    n = onnx_net.Net()
    h = n.op("Relu", [n.conv("x", 3, 8)])
    h = n.op("Pad", [h, _ints(n, [0, 2, 0, 0, 0, 1, 0, 0])])        # 2 + 8 + 1 channels
    out = _head(n, h, 11)
    doc, w, _ = self._prune(n.model(out, [4, 1, 1]))
    self.assertEqual(w["conv1_w"], (4, 3, 3, 3))
    self.assertEqual(w["w1"], (4, 7, 1, 1))

  def test_spatial_attention_reason_is_true(self):
    # CBAM: y * sigmoid(conv(concat(mean_c(y), max_c(y)))) -- the one-channel map
    # broadcasts; y's channels are blocked by the reductions over them, and the
    # report says so (once: "operands carry channels on different axes").
    n = onnx_net.Net()
    y = n.op("Relu", [n.conv("x", 3, 8)])
    pooled = n.op("Concat", [n.op("ReduceMean", [y], axes=[1], keepdims=1),
                             n.op("ReduceMax", [y], axes=[1], keepdims=1)], axis=1)
    att = n.op("Sigmoid", [n.op("Conv", [pooled, n.weight((1, 2, 3, 3))], pads=[1] * 4)])
    h = n.op("Mul", [y, att])
    out = _head(n, n.op("Relu", [n.conv(h, 8, 8)]), 8)
    doc, _, _ = self._prune(n.model(out, [4, 1, 1]))
    reasons = [r for g in doc["skipped"] for r in g["reasons"]]
    self.assertFalse(any("different axes" in r for r in reasons), reasons)
    self.assertTrue(any("reduces over the channel axis" in r for r in reasons), reasons)

  def test_qdq_model_reason_is_true(self):
    # A QDQ int8 model was refused with "no convolution or dense layer found", then
    # with "weights are not a constant"; its dequantized weight is a constant of the
    # analysis now, so the one true reason left is the graph output.
    n = onnx_net.Net()
    w = n.weight((8, 3, 3, 3))
    n.inits[-1].CopyFrom(numpy_helper.from_array(
        n.rng.integers(-100, 100, (8, 3, 3, 3)).astype(np.int8), w))
    dq = n.op("DequantizeLinear", [w, n.op("Constant", [], value=numpy_helper.from_array(
        np.array(0.01, np.float32)))])
    out = n.op("GlobalAveragePool", [n.op("Conv", ["x", dq], pads=[1] * 4)])
    tmp = self.create_tempdir().full_path
    src = os.path.join(tmp, "in.onnx")
    onnx.save_model(n.model(out, [8, 1, 1]), src)
    with self.assertRaisesRegex(errors.NothingToPruneError, "reach graph output"):
      pipeline.prune(src, os.path.join(tmp, "out.onnx"))


if __name__ == "__main__":
  absltest.main()
