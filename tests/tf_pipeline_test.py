"""Pipeline behaviour on small TensorFlow models: planted dead channels, round trip,
plans, criteria, rounding, overrides and exclusions."""

import dataclasses
import json
import os

import numpy as np
import tensorflow as tf
from absl.testing import absltest
from absl.testing import parameterized

from graph_prune import errors
from graph_prune import formats
from graph_prune import pipeline
from graph_prune import plan as plan_lib
from graph_prune.adapters import tf_model
from graph_prune.analysis import groups as groups_lib
from graph_prune.graph import arrays
from graph_prune.rewrite import slicing
from tests import keras_zoo


def _write_pb(model, path):
  gd, _, _ = keras_zoo.freeze(model)
  with open(path, "wb") as f:
    f.write(gd.SerializeToString())
  return path


def _run_pb(path, x):
  model = tf_model.load(path)
  runner = tf_model.Runner(model)
  try:
    return runner([x])[0]
  finally:
    runner.close()


def _conv_widths(path):
  model = tf_model.load(path)
  g = tf_model.to_view(model)
  return {n.name: g.constants[n.inputs[1]].shape[3] for n in g.nodes if n.op == "Conv2D"}


class PlantedTest(parameterized.TestCase):

  @parameterized.parameters("gap", "flatten")
  def test_l1_removes_exactly_the_dead_channels(self, head):
    tmp = self.create_tempdir().full_path
    model, dead = keras_zoo.make_planted_model(seed=3, head=head)
    pb = _write_pb(model, os.path.join(tmp, "planted.pb"))
    x = keras_zoo.sample_input("planted")
    # Remove exactly as many channels as are dead in conv1/conv2 and none elsewhere.
    options = pipeline.Options(
        ratio=0.0, criterion="l1",
        overrides=(("*conv1*", 3 / 8), ("*conv2*", 2 / 16)),
        plan_out=os.path.join(tmp, "plan.json"))
    out = os.path.join(tmp, "pruned.pb")
    doc = pipeline.prune(pb, out, options)
    plan = plan_lib.Plan.from_json(open(options.plan_out).read())
    # Keras 3 names the node of layer 'conv1' '<model>/conv1_1/convolution'.
    removed = {gp.sources[0].split("/")[1].rsplit("_", 1)[0]: list(gp.removed)
               for gp in plan.groups if gp.removed}
    self.assertEqual(removed, dead)
    # Dead channels contribute exactly nothing: the pruned model equals the original.
    np.testing.assert_allclose(_run_pb(out, x), model(x).numpy(), rtol=0, atol=1e-5)
    self.assertLessEqual(doc["verify"]["effect_max_abs"], 1e-5)
    widths = {k.split("/")[1].rsplit("_", 1)[0]: v for k, v in _conv_widths(out).items()}
    self.assertEqual(widths, {"conv1": 5, "conv2": 14, "conv3": 16})


class RoundTripTest(absltest.TestCase):

  def test_empty_plan_gives_identical_outputs_and_graph(self):
    tmp = self.create_tempdir().full_path
    fixture = keras_zoo.Fixture("MobileNetV2", tmp)
    pb = fixture.pb
    x = keras_zoo.sample_input("MobileNetV2")
    normalised = tf_model.normalise(tf_model.load(pb))
    g = tf_model.to_view(normalised)
    from graph_prune.analysis import groups  # pylint: disable=g-import-not-at-top
    from graph_prune.ops import tf_ops  # pylint: disable=g-import-not-at-top
    analysis = groups.analyse(g, tf_ops.REGISTRY)
    edits = slicing.build_edits(analysis, plan_lib.empty(analysis), slicing.SLICE)
    self.assertTrue(edits.empty)
    out = tf_model.apply_edits(normalised, edits)
    self.assertEqual(out.graph_def.SerializeToString(deterministic=True),
                     normalised.graph_def.SerializeToString(deterministic=True))
    path = os.path.join(tmp, "rt.pb")
    tf_model.write(out, path)
    runner = tf_model.Runner(normalised)
    np.testing.assert_array_equal(_run_pb(path, x), runner([x])[0])
    runner.close()
    # Constant folding reorders float arithmetic, so the original agrees closely, not bitwise.
    keras_out = tf.saved_model.load(fixture.saved_model).signatures["serving_default"](
        input=tf.constant(x))["output"].numpy()
    np.testing.assert_allclose(_run_pb(path, x), keras_out, rtol=1e-4, atol=1e-6)

  def test_saved_model_round_trip_keeps_signature_and_outputs(self):
    tmp = self.create_tempdir().full_path
    model, _ = keras_zoo.make_planted_model(seed=1)
    sm = keras_zoo.save_saved_model(model, os.path.join(tmp, "sm"))
    loaded = tf_model.normalise(tf_model.load(sm))
    out = os.path.join(tmp, "sm_rt")
    tf_model.write(loaded, out)
    x = keras_zoo.sample_input("planted")
    a = tf.saved_model.load(sm).signatures["serving_default"](input=tf.constant(x))
    b = tf.saved_model.load(out).signatures["serving_default"](input=tf.constant(x))
    self.assertEqual(set(a), set(b))
    np.testing.assert_array_equal(a["output"].numpy(), b["output"].numpy())


class TextFormatTest(absltest.TestCase):

  def test_pbtxt_in_pbtxt_out(self):
    tmp = self.create_tempdir().full_path
    model, _ = keras_zoo.make_planted_model(seed=2, head="flatten")
    gd, _, _ = keras_zoo.freeze(model)
    src = os.path.join(tmp, "m.pbtxt")
    with open(src, "w") as f:
      f.write(str(gd))
    out = os.path.join(tmp, "p.pbtxt")
    doc = pipeline.prune(src, out, pipeline.Options(ratio=0.5, inputs=("input",),
                                                    outputs=("Identity",)))
    self.assertTrue(doc["verify"]["passed"])
    text = open(out).read()
    self.assertTrue(text.startswith("node {"), text[:50])
    widths = {k.split("/")[1].rsplit("_", 1)[0]: v for k, v in _conv_widths(out).items()}
    self.assertEqual(widths, {"conv1": 4, "conv2": 8, "conv3": 8})

  def test_unknown_input_name_is_a_usage_error(self):
    tmp = self.create_tempdir().full_path
    model, _ = keras_zoo.make_planted_model(seed=2)
    pb = _write_pb(model, os.path.join(tmp, "m.pb"))
    with self.assertRaisesRegex(errors.UsageError, "'nope:0' is not a node"):
      pipeline.prune(pb, os.path.join(tmp, "o.pb"), pipeline.Options(inputs=("nope",)))


class PlanAndOptionsTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = absltest.get_default_test_tmpdir()
    cls.pb = keras_zoo.Fixture("ResNet50", cls.tmp).pb

  def _prune(self, name, **kw):
    out = os.path.join(self.tmp, name)
    kw.setdefault("overwrite", True)
    return out, pipeline.prune(self.pb, out, pipeline.Options(**kw))

  @parameterized.parameters("l1", "l2", "bn_scale", "fpgm", "random")
  def test_every_criterion_verifies(self, criterion):
    _, doc = self._prune(f"{criterion}.pb", criterion=criterion, ratio=0.3)
    self.assertTrue(doc["verify"]["passed"])
    self.assertLess(doc["params_after"], doc["params_before"])
    used = {g["criterion"] for g in doc["groups"]}
    self.assertEqual(used, {criterion})

  def test_plan_round_trip_is_byte_identical(self):
    plan_path = os.path.join(self.tmp, "plan.json")
    out1, doc1 = self._prune("a.pb", ratio=0.5, criterion="l2", plan_out=plan_path)
    out2, doc2 = self._prune("b.pb", plan_in=plan_path)
    self.assertEqual(open(out1, "rb").read(), open(out2, "rb").read())
    self.assertEqual(doc1["params_after"], doc2["params_after"])
    # Deterministic: the same flags give the same bytes again.
    out3, _ = self._prune("c.pb", ratio=0.5, criterion="l2")
    self.assertEqual(open(out1, "rb").read(), open(out3, "rb").read())

  def test_round_to_exclude_and_overrides(self):
    _, doc = self._prune("r.pb", ratio=0.5, round_to=8, exclude=("*conv5_*",),
                         overrides=(("*conv2_block1_1*", 0.25),))
    for g in doc["groups"]:
      self.assertEqual(g["channels_after"] % 8, 0, g)
      self.assertFalse(any("conv5_" in s for s in g["sources"]), g)
      if any("conv2_block1_1" in s for s in g["sources"]):
        self.assertEqual(g["channels_after"], 48)
    excluded = [g for g in doc["skipped"] if g["reasons"][0].startswith("excluded")]
    self.assertNotEmpty(excluded)

  def test_residual_stage_is_one_group(self):
    _, doc = self._prune("g.pb", ratio=0.5)
    stage = [g for g in doc["groups"] if any("conv2_block1_0" in s for s in g["sources"])]
    self.assertLen(stage, 1)
    names = " ".join(stage[0]["sources"])
    for block in ("conv2_block1_0", "conv2_block1_3", "conv2_block2_3", "conv2_block3_3"):
      self.assertIn(block, names)

  def test_plan_for_another_model_is_refused(self):
    plan_path = os.path.join(self.tmp, "other.json")
    with open(plan_path, "w") as f:
      f.write(plan_lib.Plan((plan_lib.GroupPlan(0, ("nope",), 4, (0,), "l1"),)).to_json())
    with self.assertRaisesRegex(errors.UsageError, "not in this model"):
      self._prune("x.pb", plan_in=plan_path)
    self.assertFalse(os.path.exists(os.path.join(self.tmp, "x.pb")))

  def test_report_json_keys(self):
    report = os.path.join(self.tmp, "r.json")
    self._prune("k.pb", report=report)
    doc = json.load(open(report))
    for key in ("params_before", "params_after", "flops_before", "flops_after", "groups",
                "skipped"):
      self.assertIn(key, doc)
    self.assertIn("max_abs_diff", doc["verify"])


class OnnxExportMemoryTest(absltest.TestCase):

  def test_regression_tf2onnx_graph_copies_are_collected_during_export(self):
    """tf2onnx's optimizer leaves graph copies (reference cycles holding every
    weight) that the generational collector seldom reaches: VGG16 at 224x224 went
    past 24 GB in conversion. The export collects them while it converts."""
    from unittest import mock  # pylint: disable=g-import-not-at-top
    import threading  # pylint: disable=g-import-not-at-top
    from graph_prune.adapters import tf_to_onnx  # pylint: disable=g-import-not-at-top
    model, _ = keras_zoo.make_planted_model(seed=1)
    gd, inp, out = keras_zoo.freeze(model)
    tfm = tf_model.TFModel(tf_model.GRAPHDEF, gd, (inp,), (out,))
    real_collect = tf_to_onnx.gc.collect
    calls = []

    def counting_collect(*args):
      calls.append(threading.current_thread().name)
      return real_collect(*args)
    with mock.patch.object(tf_to_onnx, "GC_INTERVAL_S", 0.01), \
         mock.patch.object(tf_to_onnx.gc, "collect", side_effect=counting_collect):
      exported = tf_to_onnx.export(tfm)
    self.assertIn("tf2onnx-gc", calls)
    self.assertNotIn("tf2onnx-gc", [t.name for t in threading.enumerate()])
    self.assertEqual(exported.inputs, (inp,))


class WholeCommandMemoryTest(absltest.TestCase):
  """The memory paths of the whole command (benchmarks/whole_command.py measures them
  on VGG16): each must give what the plain path gives."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.pb = keras_zoo.Fixture("ResNet50", absltest.get_default_test_tmpdir()).pb
    cls.model = tf_model.normalise(tf_model.load(cls.pb))
    cls.graph = tf_model.to_view(cls.model)

  def _prepared(self):
    fmt = formats.for_name(formats.TENSORFLOW)
    analysis = groups_lib.analyse(self.graph, fmt.ops)
    prepared = pipeline.Prepared(fmt, self.model, self.graph, analysis)
    return prepared, pipeline.make_plan(prepared, pipeline.Options(ratio=0.5))

  def test_regression_streamed_write_is_the_serialisation(self):
    """Writing a GraphDef node by node gives the encoder's bytes exactly, also with a
    function library (the whole serialisation was about four times the model)."""
    @tf.function(input_signature=[tf.TensorSpec([2, 3], tf.float32)])
    def with_library(x):
      inner = tf.function(lambda y: tf.nn.relu(y) * 2.0)
      return inner(x) + 1.0
    library_gd = with_library.get_concrete_function().graph.as_graph_def()
    self.assertNotEmpty(library_gd.library.function)
    # Large weights are encoded around their bytes (not copied into a node's buffer).
    spliced = [n.name for n in self.model.graph_def.node
               if len(tf_model._node_chunks(n)) > 1]  # pylint: disable=protected-access
    self.assertGreater(len(spliced), 10)
    for gd in (self.model.graph_def, library_gd):
      self.assertEqual(b"".join(tf_model.serialized(gd)), gd.SerializeToString(deterministic=True))

  def test_regression_view_constants_are_aligned_for_feeding_in_place(self):
    """TensorFlow copies a fed array that is not 64-byte aligned, once per run, and
    its CPU allocator keeps the copy: VGG16's oracle held every weight twice more."""
    for name, value in self.graph.constants.items():
      self.assertTrue(arrays.is_aligned(value), name)
      self.assertTrue(value.flags.writeable, name)
    odd = np.frombuffer(b"\0" * 4 + np.arange(10, dtype=np.float32).tobytes(), np.float32, 10, 4)
    self.assertFalse(arrays.is_aligned(odd))
    np.testing.assert_array_equal(arrays.aligned(odd), odd)
    self.assertTrue(arrays.is_aligned(arrays.aligned(odd)))

  def test_regression_grappler_placeholders_keep_every_output_shape(self):
    """normalise hands grappler the large weights as placeholders whose input-channel
    axis is unknown (grappler allocates a filled tensor per placeholder, which oneDNN's
    allocator kept: the size of the weights again); every layer's output shape must
    stay what it was, or constant folding would see less."""
    model = tf_model.load(self.pb)
    light, heavy = tf_model._light(model.graph_def)  # pylint: disable=protected-access
    self.assertNotEmpty(heavy)
    shrunk = tf.compat.v1.GraphDef()
    shrunk.CopyFrom(light)
    tf_model._small_fake_inputs(shrunk, heavy)  # pylint: disable=protected-access
    changed = [n.name for n, m in zip(light.node, shrunk.node) if n != m]
    self.assertCountEqual(changed, [n for n in heavy if n in {m.name for m in light.node}])

    def shapes(gd):   # of every layer and every other op (not the weights' Identity reads)
      with tf.Graph().as_default() as g:
        tf.compat.v1.import_graph_def(gd, name="")
        return {t.name: t.shape.as_list() for op in g.get_operations()
                if op.name not in heavy and op.type != "Identity"
                for t in op.outputs if t.shape.rank is not None}
    before, after = shapes(light), shapes(shrunk)
    self.assertGreater(len(before), 500)
    self.assertEqual([t for t in before if before[t] != after.get(t)], [])

  def test_regression_saved_model_over_protobuf_limit_is_frozen_without_serialising(self):
    """A SavedModel with 2 GiB or more of variables failed to load ('Invalid GraphDef':
    TensorFlow's freezer imports its result whole). Here a small SavedModel takes the
    other path (its variables said to be 2 GiB); it must give
    the same model and the same pruned model as the usual one."""
    from unittest import mock  # pylint: disable=g-import-not-at-top
    tmp = self.create_tempdir().full_path
    model, _ = keras_zoo.make_planted_model(seed=2)
    sm = keras_zoo.save_saved_model(model, os.path.join(tmp, "sm"))
    usual = tf_model.load(sm)
    with mock.patch.object(tf_model, "_variable_bytes", return_value=2**31), \
         mock.patch.object(tf_model, "_freeze_large", wraps=tf_model._freeze_large) as large:  # pylint: disable=protected-access
      apart = tf_model.load(sm)
      self.assertEqual(large.call_count, 1)
      out = os.path.join(tmp, "pruned")
      doc = pipeline.prune(sm, out, pipeline.Options(ratio=0.5))
    self.assertEqual((apart.signature, len(apart.inputs), len(apart.outputs)),
                     (usual.signature, len(usual.inputs), len(usual.outputs)))
    self.assertTrue(doc["verify"]["passed"])
    usual_doc = pipeline.prune(sm, os.path.join(tmp, "pruned_usual"), pipeline.Options(ratio=0.5))
    self.assertEqual(doc["params_after"], usual_doc["params_after"])
    x = keras_zoo.sample_input("planted")
    a = tf.saved_model.load(os.path.join(tmp, "pruned_usual")).signatures["serving_default"](
        input=tf.constant(x))
    b = tf.saved_model.load(out).signatures["serving_default"](input=tf.constant(x))
    self.assertEqual(set(a), set(b))
    np.testing.assert_allclose(a["output"].numpy(), b["output"].numpy(), rtol=1e-5, atol=1e-6)
    # A pruned model still past the limit cannot be written frozen: refused, nothing written.
    with mock.patch.object(tf_model, "_PROTO_LIMIT", 1000):
      with self.assertRaisesRegex(errors.UsageError, "cannot hold 2 GiB; prune more"):
        tf_model.write(apart, os.path.join(tmp, "too_large"))
    self.assertFalse(os.path.exists(os.path.join(tmp, "too_large")))

  def test_regression_oracle_masks_in_place_and_gives_the_weights_back(self):
    """The masked original zeroes the view's own arrays for its run instead of copying
    every weight; the arrays are the original values again afterwards, also when the
    check fails, and a wrong pruned model still fails it."""
    prepared, plan = self._prepared()
    masked = pipeline.masked_model(tf_model, self.model, prepared.analysis, plan)
    self.assertIsInstance(masked, slicing.InPlaceMask)
    self.assertNotEmpty(masked.cuts)
    before = {t: self.graph.constants[t].copy() for t in masked.cuts}
    edits = slicing.build_edits(prepared.analysis, plan, slicing.SLICE)
    pruned = tf_model.apply_edits(self.model, edits)
    cut = set(pipeline.kept_positions(prepared.analysis, plan))
    options = pipeline.Options(ratio=0.5)
    verification = pipeline.run_oracle(tf_model, self.model, masked, pruned, self.graph, options,
                                       cut, tf_model.to_view(pruned))
    self.assertTrue(verification.passed)
    for t, value in before.items():
      np.testing.assert_array_equal(self.graph.constants[t], value, err_msg=t)
    # Where the values cannot be saved to a temporary file, they come from the model.
    from unittest import mock  # pylint: disable=g-import-not-at-top
    with mock.patch.object(slicing.tempfile, "TemporaryFile", side_effect=OSError("full")):
      self.assertTrue(pipeline.run_oracle(tf_model, self.model, masked, pruned, self.graph,
                                          options, cut, tf_model.to_view(pruned)).passed)
    for t, value in before.items():
      np.testing.assert_array_equal(self.graph.constants[t], value, err_msg=t)
    # A pruned model with one kept weight changed must fail, and still give back.
    name = max(edits.constants, key=lambda t: edits.constants[t].size)
    wrong = dict(edits.constants)
    wrong[name] = edits.constants[name] + 1.0
    bad = tf_model.apply_edits(self.model, dataclasses.replace(edits, constants=wrong))
    with self.assertRaises(errors.VerificationError):
      pipeline.run_oracle(tf_model, self.model, masked, bad, self.graph, options, cut,
                          tf_model.to_view(bad))
    for t, value in before.items():
      np.testing.assert_array_equal(self.graph.constants[t], value, err_msg=t)


if __name__ == "__main__":
  absltest.main()
