"""ONNX ops whose channel semantics or operands changed across opsets, each tested
on both sides of the change: the description for the model's opset must be the
one that applies, or the pruned model is wrong (Softmax before 13 mixes all
channels) or cannot be read (axes and pads moved from attributes to inputs)."""

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


def _floats(n, values):
  return n.op("Constant", [], value=numpy_helper.from_array(np.array(values, np.float32)))


def _features(n):
  """x -> conv1 (8 channels, the group under test) -> relu."""
  return n.op("Relu", [n.conv("x", 3, 8)])


def _head(n, h):
  """A 1x1 convolution reading the 8 channels, then global pooling: conv1's group
  ends here, so it is prunable unless the op under test blocks it."""
  return n.op("GlobalAveragePool", [n.op("Conv", [h, n.weight((4, 8, 1, 1))])])


def _softmax(op):
  def build(n, opset):
    del opset
    return _head(n, n.op(op, [_features(n)])), [4, 1, 1]
  return build


def _squeeze_unsqueeze(n, opset):
  h = n.op("GlobalAveragePool", [_features(n)])               # [N, 8, 1, 1]
  if opset >= 13:
    h = n.op("Squeeze", [h, _ints(n, [2, 3])])
    h = n.op("Unsqueeze", [h, _ints(n, [2, 3])])
  else:
    h = n.op("Squeeze", [h], axes=[2, 3])
    h = n.op("Unsqueeze", [h], axes=[2, 3])
  return _head(n, h), [4, 1, 1]


def _reduce(op, change):
  def build(n, opset):
    h = _features(n)
    h = (n.op(op, [h, _ints(n, [2])], keepdims=1) if opset >= change
         else n.op(op, [h], axes=[2], keepdims=1))            # [N, 8, 1, 8]
    return _head(n, h), [4, 1, 1]
  return build


def _pad(n, opset):
  h = _features(n)
  pads = [0, 0, 1, 1, 0, 0, 1, 1]
  h = n.op("Pad", [h, _ints(n, pads)]) if opset >= 11 else n.op("Pad", [h], pads=pads)
  return _head(n, h), [4, 1, 1]


def _clip(n, opset):
  h = n.op("Conv", ["x", n.weight((8, 3, 3, 3))], pads=[1] * 4)
  h = (n.op("Clip", [h, _floats(n, 0.0), _floats(n, 6.0)]) if opset >= 11
       else n.op("Clip", [h], min=0.0, max=6.0))
  return _head(n, h), [4, 1, 1]


def _slice(n, opset):
  h = _features(n)
  if opset >= 10:
    h = n.op("Slice", [h, _ints(n, [1]), _ints(n, [7]), _ints(n, [2])])
  else:
    h = n.op("Slice", [h], starts=[1], ends=[7], axes=[2])
  return _head(n, h), [4, 1, 1]


def _resize(n, opset):
  h = _features(n)
  scales = _floats(n, [1, 1, 2, 2])
  if opset >= 11:
    h = n.op("Resize", [h, _floats(n, []), scales], mode="nearest")
  elif opset == 10:
    h = n.op("Resize", [h, scales], mode="nearest")
  elif opset == 9:
    h = n.op("Upsample", [h, scales], mode="nearest")
  else:
    h = n.op("Upsample", [h], scales=[1.0, 1.0, 2.0, 2.0], mode="nearest")
  return _head(n, h), [4, 1, 1]


# (name, builder, opset, conv1's group pruned?)
_CASES = [
    ("softmax_12_mixes_channels", _softmax("Softmax"), 12, False),
    ("softmax_13_along_last_axis", _softmax("Softmax"), 13, True),
    ("logsoftmax_12", _softmax("LogSoftmax"), 12, False),
    ("logsoftmax_13", _softmax("LogSoftmax"), 13, True),
    ("hardmax_12", _softmax("Hardmax"), 12, False),
    ("hardmax_13", _softmax("Hardmax"), 13, True),
    ("squeeze_unsqueeze_12_attribute", _squeeze_unsqueeze, 12, True),
    ("squeeze_unsqueeze_13_input", _squeeze_unsqueeze, 13, True),
    ("reducesum_12_attribute", _reduce("ReduceSum", 13), 12, True),
    ("reducesum_13_input", _reduce("ReduceSum", 13), 13, True),
    ("reducemean_17_attribute", _reduce("ReduceMean", 18), 17, True),
    ("reducemean_18_input", _reduce("ReduceMean", 18), 18, True),
    ("reducemax_17_attribute", _reduce("ReduceMax", 18), 17, True),
    ("reducemax_18_input", _reduce("ReduceMax", 18), 18, True),
    ("pad_10_attribute", _pad, 10, True),
    ("pad_11_input", _pad, 11, True),
    ("clip_10_attributes", _clip, 10, True),
    ("clip_11_inputs", _clip, 11, True),
    ("slice_9_attributes", _slice, 9, True),
    ("slice_10_inputs", _slice, 10, True),
    ("upsample_8_attribute", _resize, 8, True),
    ("upsample_9_input", _resize, 9, True),
    ("resize_10_scales_second", _resize, 10, True),
    ("resize_11_scales_third", _resize, 11, True),
]


class OpsetTest(parameterized.TestCase):

  @parameterized.named_parameters(*_CASES)
  def test_both_sides_of_the_change(self, build, opset, prunable):
    n = onnx_net.Net()
    out, out_shape = build(n, opset)
    model = n.model(out, out_shape, opset=opset, ir_version=min(8, max(4, opset - 4)))
    tmp = self.create_tempdir().full_path
    src, dst = os.path.join(tmp, "in.onnx"), os.path.join(tmp, "out.onnx")
    onnx.save_model(model, src)
    if not prunable:
      with self.assertRaisesRegex(errors.NothingToPruneError, "normalises across channels"):
        pipeline.prune(src, dst)
      return
    doc = pipeline.prune(src, dst)
    self.assertTrue(doc["verify"]["passed"])
    self.assertLessEqual(doc["verify"]["max_rel_diff"], 1e-5)
    self.assertEqual([g["sources"][0] for g in doc["groups"]], [n.nodes[0].name])
    pruned = onnx.load(dst)
    self.assertEqual(pruned.opset_import, model.opset_import)
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    y = onnxruntime.InferenceSession(dst, providers=["CPUExecutionProvider"]).run(
        None, {"x": x})[0]
    self.assertEqual(list(y.shape), [2] + out_shape)


class VersionedRuleTest(absltest.TestCase):

  def test_softmax_12_with_axis_after_the_channels_still_blocks(self):
    # Before opset 13 Softmax(axis=2) on NCHW flattens [C*0 .. H, W] rows per (N, C):
    # the channels are before the axis and pass. With axis=1 they are inside.
    for axis, prunable in ((2, True), (1, False)):
      n = onnx_net.Net()
      out = _head(n, n.op("Softmax", [_features(n)], axis=axis))
      tmp = self.create_tempdir().full_path
      src = os.path.join(tmp, "in.onnx")
      onnx.save_model(n.model(out, [4, 1, 1], opset=12), src)
      if prunable:
        doc = pipeline.prune(src, os.path.join(tmp, "out.onnx"))
        self.assertEqual(doc["groups_pruned"], 1)
      else:
        with self.assertRaises(errors.NothingToPruneError):
          pipeline.prune(src, os.path.join(tmp, "out.onnx"))

  def test_custom_domain_op_with_a_standard_name_blocks(self):
    n = onnx_net.Net()
    h = _features(n)
    n.nodes.append(helper.make_node("Relu", [h], ["custom"], domain="com.example"))
    out = _head(n, "custom")
    model = n.model(out, [4, 1, 1], domains=["com.example"])
    tmp = self.create_tempdir().full_path
    src = os.path.join(tmp, "in.onnx")
    onnx.save_model(model, src)
    with self.assertRaisesRegex(errors.NothingToPruneError,
                                "no channel rule for op type com.example.Relu"):
      pipeline.prune(src, os.path.join(tmp, "out.onnx"))
    self.assertFalse(os.path.exists(os.path.join(tmp, "out.onnx")))

if __name__ == "__main__":
  absltest.main()
