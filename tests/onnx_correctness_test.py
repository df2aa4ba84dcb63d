"""Regression tests for ONNX models that once gave a wrong model, a traceback or a
refusal with a false reason (the adversarial battery of the correctness issue).
Each test names the bug it guards against."""

import os

import numpy as np
import onnx
import onnxruntime
from absl.testing import absltest
from onnx import helper
from onnx import numpy_helper

from graph_prune import errors
from graph_prune import pipeline
from tests import onnx_net

_F = onnx.TensorProto.FLOAT


def _session(path):
  return onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])


def _conv_node(inp, weight, out, pads=1):
  return helper.make_node("Conv", [inp, weight], [out], pads=[pads] * 4)


class _Case(absltest.TestCase):

  def _save(self, model, name="in.onnx"):
    tmp = self.create_tempdir().full_path
    path = os.path.join(tmp, name)
    onnx.save_model(model, path)
    return tmp, path

  def _prune(self, model, **kw):
    tmp, src = self._save(model)
    with open(src, "rb") as f:
      before = f.read()
    out = os.path.join(tmp, "out.onnx")
    doc = pipeline.prune(src, out, pipeline.Options(**kw))
    with open(src, "rb") as f:
      self.assertEqual(f.read(), before)
    onnx.checker.check_model(onnx.load(out), full_check=True)
    return doc, src, out

  def _refused(self, model, error, pattern, **kw):
    tmp, src = self._save(model)
    with self.assertRaisesRegex(error, pattern):
      pipeline.prune(src, os.path.join(tmp, "out.onnx"), pipeline.Options(**kw))
    self.assertEqual(os.listdir(tmp), ["in.onnx"])


def _if_model(cond_rank0=True):
  """x -> conv1 -> relu -> conv2 -> h; If(cond) then conv3(h) else conv4(relu(h)).

  conv1's channels are read by conv2 only (prunable); h is read only inside the
  branches, from the outer scope."""
  n = onnx_net.Net()
  h = n.op("Relu", [n.conv("x", 3, 8)])
  h = n.conv(h, 8, 8)
  w3, w4 = n.weight((4, 8, 3, 3)), n.weight((4, 8, 1, 1))
  out_info = lambda name: helper.make_tensor_value_info(name, _F, ["N", 4, 8, 8])
  then_g = helper.make_graph([_conv_node(h, w3, "t_out")], "then", [], [out_info("t_out")])
  else_g = helper.make_graph([helper.make_node("Relu", [h], ["e_relu"]),
                              _conv_node("e_relu", w4, "e_out", pads=0)],
                             "else", [], [out_info("e_out")])
  n.nodes.append(helper.make_node("If", ["cond"], ["y"], name="if1", then_branch=then_g,
                                  else_branch=else_g))
  cond = helper.make_tensor_value_info("cond", onnx.TensorProto.BOOL,
                                       [] if cond_rank0 else [1])
  return n.model("y", [4, 8, 8], extra_inputs=[cond])


class SubgraphTest(_Case):

  def test_if_else_branch_reading_a_pruned_conv_output(self):
    # Bug: the analysis did not see reads inside subgraphs, so the else branch's
    # weights were not cut, and the oracle only ever took the then branch: a
    # wrong model with "verification: PASSED".
    doc, _, out = self._prune(_if_model())
    reasons = [r for g in doc["skipped"] for r in g["reasons"]]
    self.assertTrue(any("'conv2' is read inside a subgraph" in r for r in reasons), reasons)
    self.assertEqual([g["sources"] for g in doc["groups"]], [["conv1"]])
    # The oracle ran both branches: two input sets of two samples.
    self.assertEqual(doc["verify"]["samples"], 4)
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    sess = _session(out)
    for cond in (True, False):
      y = sess.run(None, {"x": x, "cond": np.array(cond)})[0]
      self.assertEqual(y.shape, (2, 4, 8, 8))
      self.assertTrue(np.all(np.isfinite(y)))

  def test_rank0_boolean_input(self):
    # Bug: the oracle's input generator crashed on a rank-0 boolean input
    # (a numpy.bool scalar instead of an array).
    doc, _, _ = self._prune(_if_model(cond_rank0=True))
    self.assertTrue(doc["verify"]["passed"])

  def test_loop_body_reading_outer_scope(self):
    # Bug: a Loop body reading a tensor with pruned channels gave a traceback,
    # and with --noverify an unrunnable model.
    n = onnx_net.Net()
    h = n.op("Relu", [n.conv("x", 3, 8)])
    h = n.conv(h, 8, 6)
    body = helper.make_graph(
        [helper.make_node("Add", ["acc_in", h], ["acc_out"]),
         helper.make_node("Identity", ["cond_in"], ["cond_out"])],
        "body",
        [helper.make_tensor_value_info("i", onnx.TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", onnx.TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_in", _F, ["N", 6, 8, 8])],
        [helper.make_tensor_value_info("cond_out", onnx.TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_out", _F, ["N", 6, 8, 8])])
    trips = n.op("Constant", [], value=numpy_helper.from_array(np.array(3, np.int64)))
    # The loop's initial value comes from another convolution: h is read in the
    # body only.
    zero = n.op("Mul", [n.conv("x", 3, 6), n.op("Constant", [], value=numpy_helper.from_array(
        np.array(0, np.float32)))])
    n.nodes.append(helper.make_node("Loop", [trips, "", zero], ["y"], name="loop1", body=body))
    model = n.model("y", [6, 8, 8])
    for verify in (True, False):
      doc, src, out = self._prune(model, verify=verify)
      self.assertEqual([g["sources"] for g in doc["groups"]], [["conv1"]])
      reasons = [r for g in doc["skipped"] for r in g["reasons"]]
      self.assertIn("Loop 'loop1': 'conv2' is read inside a subgraph", reasons)
      x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
      self.assertEqual(_session(out).run(None, {"x": x})[0].shape, (2, 6, 8, 8))

  def test_folded_tensor_read_only_by_a_subgraph_is_kept(self):
    # Bug: normalisation folded a tensor that only a subgraph read, then dropped
    # it as unread (it counted top-level readers only).
    n = onnx_net.Net()
    h = n.op("Relu", [n.conv("x", 3, 8)])
    h = n.op("GlobalAveragePool", [n.conv(h, 8, 4)])
    a = n.op("Constant", [], value=numpy_helper.from_array(np.array([-1], np.int64)))
    b = n.op("Constant", [], value=numpy_helper.from_array(np.array([4], np.int64)))
    shape = n.op("Concat", [a, b], axis=0)            # folded into an initializer
    out_info = helper.make_tensor_value_info("r", _F, ["N", 4])
    branch = lambda name: helper.make_graph(
        [helper.make_node("Reshape", [h, shape], ["r"])], name, [], [out_info])
    n.nodes.append(helper.make_node("If", ["cond"], ["y"], then_branch=branch("t"),
                                    else_branch=branch("e")))
    cond = helper.make_tensor_value_info("cond", onnx.TensorProto.BOOL, [])
    doc, _, out = self._prune(n.model("y", [4], extra_inputs=[cond]))
    self.assertTrue(doc["verify"]["passed"])
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    self.assertEqual(_session(out).run(None, {"x": x, "cond": np.array(False)})[0].shape, (2, 4))


class ShapeTest(_Case):

  def test_shapes_after_a_loop_are_measured(self):
    # Bug: shape inference stops at a Loop whose body has no shapes; the layers
    # after it were refused over "operand ranks unknown", though their widths
    # are in their weights.
    n = onnx_net.Net()
    h = n.op("Relu", [n.conv("x", 3, 6)])
    untyped = lambda name: helper.make_tensor_value_info(name, _F, None)
    body = helper.make_graph(
        [helper.make_node("Add", ["acc_in", "acc_in"], ["acc_out"]),
         helper.make_node("Identity", ["cond_in"], ["cond_out"])], "body",
        [helper.make_tensor_value_info("i", onnx.TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", onnx.TensorProto.BOOL, []), untyped("acc_in")],
        [helper.make_tensor_value_info("cond_out", onnx.TensorProto.BOOL, []),
         untyped("acc_out")])
    trips = n.op("Constant", [], value=numpy_helper.from_array(np.array(2, np.int64)))
    n.nodes.append(helper.make_node("Loop", [trips, "", h], ["lp"], name="loop1", body=body))
    h = n.op("Relu", [n.op("Add", [n.conv("lp", 6, 8), n.weight((8, 1, 1))])])
    out = n.op("GlobalAveragePool", [n.conv(h, 8, 4)])
    doc, _, _ = self._prune(n.model(out, [4, 1, 1]))
    self.assertEqual([g["sources"] for g in doc["groups"]], [["conv2"]])


class ProducerTest(_Case):

  def test_every_producer_keeps_a_channel(self):
    # Bug (random CNN {"seed": 1081530687, "fmt": "tf", "ratio": 0.9, ...}): two
    # convolutions concatenated and coupled by a residual add form one group;
    # keeping its single best unit left one convolution with no filters, and the
    # pruned model did not run.
    n = onnx_net.Net()
    a = n.op("Relu", [n.conv("x", 3, 2)])
    b = n.op("Relu", [n.conv("x", 3, 6)])
    h = n.op("Add", [n.op("Concat", [a, b], axis=1), n.conv("x", 3, 8)])
    out = n.op("GlobalAveragePool", [n.conv(n.op("Relu", [h]), 8, 4)])
    doc, _, path = self._prune(n.model(out, [4, 1, 1]), ratio=0.9)
    widths = {t.name: t.dims[0] for t in onnx.load(path).graph.initializer
              if t.name in ("conv1_w", "conv2_w", "conv3_w")}
    self.assertEqual(widths["conv1_w"], 1)
    self.assertEqual(widths["conv2_w"], 1)
    self.assertEqual(widths["conv3_w"], 2)


class OracleInputTest(_Case):

  def test_unknown_spatial_dims_and_unpadded_5x5_convolutions(self):
    # Bug: unknown spatial dims were fed as 2x2, too small for a 5x5 and an
    # unpadded 3x3 convolution: a traceback from ONNX Runtime.
    n = onnx_net.Net()
    h = n.op("Relu", [n.op("Conv", ["x", n.weight((8, 3, 5, 5)), n.weight((8,))])])
    h = n.op("Relu", [n.op("Conv", [h, n.weight((8, 8, 3, 3)), n.weight((8,))])])
    out = n.op("GlobalAveragePool", [n.op("Conv", [h, n.weight((4, 8, 1, 1))])])
    doc, _, _ = self._prune(n.model(out, [4, 1, 1], size=None))
    self.assertTrue(doc["verify"]["passed"])
    self.assertEqual(doc["groups_pruned"], 2)

  def test_input_shape_flag(self):
    n = onnx_net.Net()
    h = n.op("Relu", [n.op("Conv", ["x", n.weight((8, 3, 5, 5))])])
    out = n.op("GlobalAveragePool", [n.op("Conv", [h, n.weight((4, 8, 1, 1))])])
    model = n.model(out, [4, 1, 1], size=None)
    doc, _, _ = self._prune(model, input_shapes=(("x", (1, 3, 9, 9)),))
    self.assertEqual(doc["verify"]["samples"], 1)
    self._refused(model, errors.InputError, "does not run on the verification inputs",
                  input_shapes=(("", (1, 3, 3, 3)),))
    self._refused(model, errors.UsageError, "not a model input",
                  input_shapes=(("y", (1, 3, 9, 9)),))
    self._refused(model, errors.UsageError, "does not fit input",
                  input_shapes=(("x", (1, 4, 9, 9)),))


class RefusalTest(_Case):

  def _chain(self):
    n = onnx_net.Net()
    h = n.op("Relu", [n.conv("x", 3, 8)])
    out = n.op("GlobalAveragePool", [n.conv(h, 8, 4)])
    return n.model(out, [4, 1, 1])

  def test_non_finite_weights_are_refused(self):
    # Bug: a NaN filter scored last, was removed although live, and the NaN
    # output of the original became finite: "verification: PASSED".
    model = self._chain()
    w = next(t for t in model.graph.initializer if t.name == "conv1_w")
    value = numpy_helper.to_array(w).copy()
    value[2, 0, 0, 0] = np.nan
    w.CopyFrom(numpy_helper.from_array(value, "conv1_w"))
    self._refused(model, errors.InputError, "'conv1_w' .* NaN or infinite")

  def test_nan_tolerance_is_a_usage_error(self):
    # Bug: --tolerance=nan was a failed verification after all the work.
    for tolerance in (float("nan"), -1.0, float("inf")):
      self._refused(self._chain(), errors.UsageError, "--tolerance", tolerance=tolerance)

  def test_exclude_matching_every_group(self):
    # Bug: --exclude matching every group wrote an unchanged model with exit 0.
    self._refused(self._chain(), errors.NothingToPruneError, "--exclude=conv\\*",
                  exclude=("conv*",))

  def test_ratio_zero_writes_the_input_unchanged(self):
    # Bug: --ratio=0 wrote the normalised graph and listed every group as
    # "pruned 8 -> 8".
    n = onnx_net.Net()
    h = n.op("Relu", [n.conv("x", 3, 8)])
    a = n.op("Constant", [], value=numpy_helper.from_array(np.array([0, -1], np.int64)))
    h = n.op("Reshape", [n.op("GlobalAveragePool", [n.conv(h, 8, 4)]), a])
    model = n.model(h, [4])
    doc, src, out = self._prune(model, ratio=0.0)
    self.assertTrue(doc["unchanged"])
    self.assertEqual(doc["groups_pruned"], 0)
    self.assertEqual(doc["groups"], [])
    self.assertIsNone(doc["verify"])
    self.assertEqual(onnx.load(out), onnx.load(src))


class HygieneTest(_Case):

  def test_no_unread_initializers_are_left(self):
    # Bug: initializers that nothing read any more were left in the file (after
    # normalisation folded shape arithmetic), so the output could be larger.
    n = onnx_net.Net()
    h = n.op("Relu", [n.conv("x", 3, 16)])
    h = n.op("GlobalAveragePool", [n.conv(h, 16, 4)])
    a = n.weight((1,), name="shape_a")
    n.inits[-1].CopyFrom(numpy_helper.from_array(np.array([-1], np.int64), "shape_a"))
    b = n.weight((1,), name="shape_b")
    n.inits[-1].CopyFrom(numpy_helper.from_array(np.array([4], np.int64), "shape_b"))
    out = n.op("Reshape", [h, n.op("Concat", [a, b], axis=0)])
    doc, src, path = self._prune(n.model(out, [4]))
    m = onnx.load(path)
    read = {t for node in m.graph.node for t in node.input}
    self.assertEqual([t.name for t in m.graph.initializer if t.name not in read], [])
    self.assertLess(os.path.getsize(path), os.path.getsize(src))

  def test_shared_weight_copies_are_reported(self):
    # Bug: a weight shared by two convolutions that keep different channels was
    # copied per consumer without a word, so parameters went up.
    n = onnx_net.Net()
    a = n.op("Relu", [n.conv("x", 3, 8)])
    b = n.op("Relu", [n.conv("x", 3, 8)])
    shared = n.weight((4, 8, 3, 3), name="shared_w")
    ya = n.op("Conv", [a, shared], pads=[1] * 4)
    yb = n.op("Conv", [b, shared], pads=[1] * 4)
    out = n.op("Concat", [ya, yb], axis=1)
    model = n.model(out, [8, 8, 8])
    doc, _, path = self._prune(model, criterion="random", seed=3, ratio=0.5)
    self.assertEqual(doc["shared_constants_copied"],
                     [{"constant": "shared_w", "copies": 1,
                       "why": "its readers keep different channels of it: one constant per "
                              "distinct slice"}])
    m = onnx.load(path)
    names = [t.name for t in m.graph.initializer]
    self.assertIn("shared_w", names)   # the original name is reused, not orphaned
    read = {t for node in m.graph.node for t in node.input}
    self.assertTrue(set(names) <= read)

  def test_initializers_listed_as_graph_inputs(self):
    # Bug: models with initializers among the graph inputs (torch's
    # keep_initializers_as_inputs=True) ended with "please report this model".
    n = onnx_net.Net()
    h = n.op("Relu", [n.conv("x", 3, 8)])
    out = n.op("GlobalAveragePool", [n.conv(h, 8, 4)])
    model = n.model(out, [4, 1, 1])
    for t in model.graph.initializer:
      model.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, t.dims))
    doc, _, path = self._prune(model)
    self.assertEqual(doc["groups_pruned"], 1)
    m = onnx.load(path)
    dims = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in m.graph.input}
    self.assertEqual(dims["conv1_w"], [4, 3, 3, 3])
    x = np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)
    self.assertEqual(_session(path).run(None, {"x": x})[0].shape, (1, 4, 1, 1))


if __name__ == "__main__":
  absltest.main()
