"""Channel rules and union-find analysis on hand-built graph views (no TensorFlow)."""

import numpy as np
from absl.testing import absltest

from graph_prune import plan as plan_lib
from graph_prune.analysis import groups
from graph_prune.criteria import allocation
from graph_prune.criteria import importance
from graph_prune.graph import view
from graph_prune.rewrite import slicing
from graph_prune.ops import tf_ops


class _Builder:
  """A tiny NHWC graph builder: every op has one output named '<name>:0'."""

  def __init__(self, seed=0):
    self.nodes, self.consts, self.shapes = [], {}, {}
    self.rng = np.random.default_rng(seed)

  def _add(self, name, op, inputs, shape, **attrs):
    t = f"{name}:0"
    self.nodes.append(view.Node(name, op, tuple(inputs), (t,), attrs))
    self.shapes[t] = shape
    return t

  def const(self, name, value):
    value = np.asarray(value)
    t = self._add(name, "Const", (), tuple(value.shape))
    self.consts[t] = value
    return t

  def input(self, name, shape):
    return self._add(name, "Placeholder", (), shape)

  def conv(self, name, x, cout, k=1, groups=1, **attrs):
    cin = self.shapes[x][3] // groups
    w = self.const(name + "/w", self.rng.standard_normal((k, k, cin, cout)))
    return self._add(name, "Conv2D", (x, w), self.shapes[x][:3] + (cout,), **attrs)

  def op(self, name, op, inputs, shape=None, **attrs):
    return self._add(name, op, inputs, shape or self.shapes[inputs[0]], **attrs)

  def bias(self, name, x):
    b = self.const(name + "/b", self.rng.standard_normal(self.shapes[x][-1]))
    return self.op(name, "BiasAdd", (x, b))

  def view(self, outputs, inputs=("x:0",)):
    return view.GraphView(self.nodes, self.consts, self.shapes, inputs, outputs, "NHWC")


def _analyse(g):
  return groups.analyse(g, tf_ops.REGISTRY)


def _group_of(analysis, source):
  return next(g for g in analysis.groups if source in g.sources)


class AnalysisTest(absltest.TestCase):

  def test_chain_prunes_inner_conv_and_blocks_output(self):
    b = _Builder()
    x = b.input("x", (None, 8, 8, 3))
    h = b.op("r1", "Relu", (b.bias("b1", b.conv("c1", x, 6)),))
    y = b.conv("c2", h, 4)
    a = _analyse(b.view([y]))
    g1, g2 = _group_of(a, "c1"), _group_of(a, "c2")
    self.assertTrue(g1.prunable)
    self.assertEqual(g1.channels, 6)
    self.assertEqual(set(g1.members), {"c1", "b1", "c2"})
    self.assertIn("graph output", g2.blocked[0])
    cuts = {(s.const, s.axis, s.role) for s in a.slices}
    self.assertIn(("c2/w:0", 2, "sink"), cuts)
    self.assertIn(("c1/w:0", 3, "source"), cuts)
    self.assertIn(("b1/b:0", 0, "param"), cuts)

  def test_residual_add_couples_every_producer_of_the_stage(self):
    b = _Builder()
    x = b.input("x", (None, 8, 8, 3))
    s = b.conv("stem", x, 5)
    r1 = b.op("add1", "AddV2", (s, b.conv("c1", s, 5)))
    r2 = b.op("add2", "AddV2", (r1, b.conv("c2", r1, 5)))
    y = b.conv("head", r2, 2)
    a = _analyse(b.view([y]))
    g = _group_of(a, "stem")
    self.assertEqual(set(g.sources), {"stem", "c1", "c2"})
    self.assertTrue(g.prunable)
    self.assertEqual(g.channels, 5)

  def test_concat_of_the_same_tensor_twice_keeps_two_ranges(self):
    b = _Builder()
    x = b.input("x", (None, 4, 4, 3))
    c = b.conv("c1", x, 4)
    d = b.conv("c2", x, 3)
    axis = b.const("axis", np.int32(3))
    cat = b.op("cat", "ConcatV2", (c, d, c, axis), (None, 4, 4, 11))
    y = b.conv("head", cat, 2)
    a = _analyse(b.view([y]))
    units = a.dims[cat].units
    self.assertLen(units, 11)
    np.testing.assert_array_equal(units[:4], units[7:])
    g1 = _group_of(a, "c1")
    p = plan_lib.Plan((plan_lib.GroupPlan(g1.id, g1.sources, 4, (0, 2), "l1"),))
    edits = slicing.build_edits(a, p, slicing.SLICE)
    w = edits.constants["head/w:0"]
    self.assertEqual(w.shape, (1, 1, 7, 2))
    full = b.consts["head/w:0"]
    np.testing.assert_array_equal(w[0, 0], full[0, 0][[0, 2, 4, 5, 6, 7, 9]])

  def test_depthwise_multiplier_repeats_channels(self):
    b = _Builder()
    x = b.input("x", (None, 4, 4, 3))
    c = b.conv("c1", x, 3)
    w = b.const("dw/w", np.ones((3, 3, 3, 2)))
    dw = b.op("dw", "DepthwiseConv2dNative", (c, w), (None, 4, 4, 6))
    y = b.conv("head", dw, 2)
    a = _analyse(b.view([y]))
    u = a.dims["c1:0"].units
    np.testing.assert_array_equal(a.dims[dw].units, np.repeat(u, 2))
    self.assertTrue(_group_of(a, "c1").prunable)

  def test_one_output_channel_conv_is_not_depthwise(self):
    b = _Builder()
    x = b.input("x", (None, 4, 4, 3))
    c = b.conv("c1", x, 1)
    y = b.conv("head", c, 2)
    a = _analyse(b.view([y]))
    g = _group_of(a, "c1")
    self.assertTrue(g.prunable)
    self.assertEqual(allocation.kept_count(g.channels, 0.9, 1), 1)

  def test_grouped_conv_couples_the_same_position_of_every_group(self):
    b = _Builder()
    x = b.input("x", (None, 4, 4, 4))
    c = b.conv("c1", x, 8)
    gconv = b.conv("gconv", c, 8, groups=2)
    y = b.conv("head", gconv, 2)
    a = _analyse(b.view([y]))
    # 8 channels in 2 groups: 4 units of 2 channels (position k of each group).
    for name in ("c1", "gconv"):
      group = _group_of(a, name)
      self.assertTrue(group.prunable, group.blocked)
      self.assertEqual(group.channels, 4)
    units = a.element_unit[a.dims[c].units]
    np.testing.assert_array_equal(units, [0, 1, 2, 3, 0, 1, 2, 3])

  def test_reduction_over_channels_blocks(self):
    b = _Builder()
    x = b.input("x", (None, 4, 4, 3))
    c = b.conv("c1", x, 5)
    axes = b.const("axes", np.int32([-1]))
    m = b.op("mean", "Mean", (c, axes), (None, 4, 4, 1), keep_dims=True)
    y = b.op("out", "AddV2", (m, m))
    a = _analyse(b.view([y]))
    self.assertIn("reduces over the channel axis", _group_of(a, "c1").blocked[0])

  def test_op_without_rule_blocks_and_names_the_op(self):
    b = _Builder()
    x = b.input("x", (None, 4, 4, 3))
    c = b.conv("c1", x, 5)
    y = b.conv("head", b.op("lrn", "LRN", (c,)), 2)
    a = _analyse(b.view([y]))
    self.assertIn("no channel rule for op type LRN", _group_of(a, "c1").blocked[0])

  def test_flatten_nhwc_and_nchw_index_maps(self):
    for fmt, expect in (("NHWC", lambda u: np.tile(u, 4)), ("NCHW", lambda u: np.repeat(u, 4))):
      b = _Builder()
      shape = (None, 2, 2, 3) if fmt == "NHWC" else (None, 3, 2, 2)
      x = b.input("x", shape)
      w = b.const("c1/w", np.ones((1, 1, 3, 3)))
      c = b.op("c1", "Conv2D", (x, w), shape, data_format=fmt)
      s = b.const("shape", np.int32([-1, 12]))
      f = b.op("flat", "Reshape", (c, s), (None, 12))
      m = b.op("fc", "MatMul", (f, b.const("fc/w", np.ones((12, 2)))), (None, 2))
      a = _analyse(b.view([m]))
      np.testing.assert_array_equal(a.dims[f].units, expect(a.dims[c].units), err_msg=fmt)
      g = _group_of(a, "c1")
      p = plan_lib.Plan((plan_lib.GroupPlan(g.id, g.sources, 3, (1,), "l1"),))
      self.assertEqual(slicing.build_edits(a, p, slicing.SLICE).constants["fc/w:0"].shape, (4, 2))

  def test_shared_constant_is_copied_per_consumer(self):
    b = _Builder()
    x = b.input("x", (None, 4, 4, 3))
    shared = b.const("zeros", np.zeros(4))
    c1 = b.op("b1", "BiasAdd", (b.conv("c1", x, 4), shared))
    c2 = b.op("b2", "BiasAdd", (b.conv("c2", x, 4), shared))
    y = b.op("out", "ConcatV2", (b.conv("h1", c1, 2), b.conv("h2", c2, 2),
                                 b.const("axis", np.int32(3))), (None, 4, 4, 4))
    a = _analyse(b.view([y]))
    g1 = _group_of(a, "c1")
    p = plan_lib.Plan((plan_lib.GroupPlan(g1.id, g1.sources, 4, (0, 1), "l1"),))
    e = slicing.build_edits(a, p, slicing.SLICE)
    self.assertNotIn("zeros:0", e.constants)
    self.assertEqual([(n, v.shape) for n, (_, v) in e.new_constants.items()],
                     [("zeros/gp_copy/b1", (2,))])
    self.assertEqual(e.rewires, (("b1", 1, "zeros/gp_copy/b1"),))

  def test_mask_mode_zeroes_only_weights(self):
    b = _Builder()
    x = b.input("x", (None, 4, 4, 3))
    h = b.bias("b1", b.conv("c1", x, 4))
    y = b.conv("c2", h, 2)
    a = _analyse(b.view([y]))
    g = _group_of(a, "c1")
    p = plan_lib.Plan((plan_lib.GroupPlan(g.id, g.sources, 4, (1, 3), "l1"),))
    e = slicing.build_edits(a, p, slicing.MASK)
    self.assertEqual(set(e.constants), {"c1/w:0", "c2/w:0"})
    np.testing.assert_array_equal(e.constants["c1/w:0"][..., [0, 2]], 0)
    np.testing.assert_array_equal(e.constants["c1/w:0"][..., [1, 3]], b.consts["c1/w:0"][..., [1, 3]])
    np.testing.assert_array_equal(e.constants["c2/w:0"][:, :, [0, 2]], 0)

  def test_l1_removes_the_smallest_filters(self):
    b = _Builder()
    x = b.input("x", (None, 4, 4, 3))
    c = b.conv("c1", x, 4)
    b.consts["c1/w:0"] = np.stack([np.full((1, 1, 3), v) for v in (3.0, 0.5, 2.0, 0.1)], -1)
    y = b.conv("c2", c, 2)
    a = _analyse(b.view([y]))
    scores = importance.score(a, "l1")
    p = allocation.allocate(a, scores, allocation.Spec(0.5), "l1")
    self.assertEqual(p.groups[0].keep, (0, 2))
    self.assertEqual(allocation.kept_count(10, 0.5, 4), 8)
    self.assertEqual(allocation.kept_count(3, 0.5, 8), 3)


if __name__ == "__main__":
  absltest.main()
