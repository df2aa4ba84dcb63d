"""The per-layer latency profile of --allocation=latency (bench/layer_latency.py):
every linear layer found with its own geometry, each built alone and timed in
the model's own runtime, cached so that a second profile times nothing, and
the table's interpolation."""

import os

from absl.testing import absltest
import numpy as np
import onnx

from graph_prune import formats
from graph_prune import pipeline
from graph_prune.bench import layer_latency
from tests import binaries
from tests import onnx_net


def _onnx_model():
  """conv 3->8 (3x3, SAME) -> ReLU -> conv 8->8 stride 2 -> ReLU -> GAP -> Gemm 8->10."""
  net = onnx_net.Net(0)
  h = net.op("Relu", [net.conv("x", 3, 8)])
  h = net.op("Relu", [net.conv(h, 8, 8, stride=2)])
  h = net.op("Flatten", [net.op("GlobalAveragePool", [h])])
  return net.model(net.dense(h, (8, 10)), [10])


class TableTest(absltest.TestCase):

  def _table(self):
    shape = layer_latency.Shape("conv", (8, 8), (3, 3), (1, 1), (1, 1), ((1, 1), (1, 1)), 8, 16)
    points = {(a, b): float(a * b) for a, b in shape.widths()}
    return shape, layer_latency.Table.from_points(shape, points)

  def test_grid_points_exact_bilinear_between_held_below(self):
    shape, table = self._table()
    self.assertEqual(shape.widths()[0], (1, 2))          # an eighth of each, at least 1
    for (a, b) in shape.widths():
      self.assertEqual(table(a, b), a * b)
    self.assertAlmostEqual(table(3, 10), 30.0)            # a*b is bilinear: exact
    self.assertEqual(table(0.5, 1), table(1, 2))          # below the grid: held

  def test_noise_never_makes_more_channels_cheaper(self):
    shape, _ = self._table()
    rng = np.random.default_rng(0)
    points = {(a, b): float(a * b) * rng.uniform(0.5, 1.5) for a, b in shape.widths()}
    table = layer_latency.Table.from_points(shape, points)
    ins, outs = sorted({a for a, _ in points}), sorted({b for _, b in points})
    for a0, a1 in zip(ins, ins[1:]):
      for b0, b1 in zip(outs, outs[1:]):
        self.assertLessEqual(table(a0, b0), table(a1, b0))
        self.assertLessEqual(table(a0, b0), table(a0, b1))
    self.assertEqual(table(ins[-1], outs[-1]), max(points.values()))

  def test_depthwise_has_one_width(self):
    shape = layer_latency.Shape("depthwise", (8, 8), (3, 3), (1, 1), (1, 1), ((1, 1), (1, 1)),
                                16, 16)
    self.assertTrue(all(a == b for a, b in shape.widths()))
    table = layer_latency.Table.from_points(shape, {(a, b): 2.0 * a for a, b in shape.widths()})
    self.assertAlmostEqual(table(10, 10), 20.0)


class ProfileTest(absltest.TestCase):

  def _view(self, path):
    fmt = formats.for_name(formats.ONNX)
    return fmt, fmt.adapter.to_view(fmt.adapter.load(path))

  def test_layers_found_with_their_geometry(self):
    path = os.path.join(self.create_tempdir().full_path, "m.onnx")
    onnx.save(_onnx_model(), path)
    fmt, view = self._view(path)
    layers = layer_latency.layers_of(view, fmt.ops, batch=4)
    self.assertEqual([l.node for l in layers], ["conv1", "conv2", "gemm1"])
    c1, c2, g = (l.shape for l in layers)
    self.assertEqual((c1.kind, c1.spatial, c1.cin, c1.cout, c1.batch), ("conv", (8, 8), 3, 8, 4))
    self.assertEqual(c2.strides, (2, 2))
    self.assertEqual((g.kind, g.cin, g.cout), ("dense", 8, 10))

  def test_onnx_profile_is_cached(self):
    tmp = self.create_tempdir().full_path
    path, cache = os.path.join(tmp, "m.onnx"), os.path.join(tmp, "cache.json")
    onnx.save(_onnx_model(), path)
    fmt, view = self._view(path)
    first = layer_latency.profile(view, fmt.ops, "onnx", "cpu", batch=2, cache=cache)
    points = sum(len(l.shape.widths()) for l in first.layers)
    self.assertEqual(first.doc["points_timed"], points)
    self.assertGreater(first.total(), 0)
    second = layer_latency.profile(view, fmt.ops, "onnx", "cpu", batch=2, cache=cache)
    self.assertEqual((second.doc["points_timed"], second.doc["points_cached"]), (0, points))
    self.assertEqual(first.total(), second.total())
    other = layer_latency.profile(view, fmt.ops, "onnx", "cpu", batch=3, cache=cache)
    self.assertEqual(other.doc["points_timed"], points)     # the batch is part of the key

  def test_tensorflow_layers_timed_under_xla(self):
    prepared = pipeline.prepare(os.path.join(binaries.ROOT, "models", "default",
                                             "fmnist_vgg_bn.pb"))
    fmt, view = prepared.format, prepared.graph
    cache = os.path.join(self.create_tempdir().full_path, "cache.json")
    old = layer_latency.GRID
    layer_latency.GRID = (0.5, 1.0)
    try:
      prof = layer_latency.profile(view, fmt.ops, "tensorflow", "cpu", batch=1, cache=cache)
    finally:
      layer_latency.GRID = old
    kinds = [l.shape.kind for l in prof.layers]
    self.assertEqual(kinds.count("conv"), 5)
    self.assertEqual(kinds.count("dense"), 2)
    self.assertEqual(prof.doc["untimed"], [])
    full = [f(l.cin, l.cout) for l, f in zip(prof.layers, prof.costs)]
    half = [f(l.cin / 2, l.cout / 2) for l, f in zip(prof.layers, prof.costs)]
    self.assertTrue(all(np.isfinite(full)) and min(full) > 0)
    # A quarter of the work is not slower than all of it, on the layers that
    # dominate (the largest convolution by time).
    i = int(np.argmax(full))
    self.assertLess(half[i], full[i])


if __name__ == "__main__":
  absltest.main()
