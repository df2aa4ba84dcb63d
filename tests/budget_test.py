"""Allocation across groups and budgets (--allocation=global|latency, --target_flops,
--target_params, --target_speedup, --target_latency_ms): planted unimportant
channels go first under a global ranking, budgets are met by the least pruning
that meets them, the oracle passes, and bad requests are refused in one line.
The search for a latency budget is tested with a probe whose "latency" is the
FLOPs (deterministic); the real timing through the command."""

import json
import os
import subprocess
import types

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np
import onnx
from onnx import numpy_helper

from graph_prune import errors
from graph_prune import formats
from graph_prune import pipeline
from graph_prune.analysis import cost
from graph_prune.bench import latency
from graph_prune.calibration import samples as samples_lib
from graph_prune.pipeline import layer_modes
from graph_prune.verify import agreement
from tests import binaries
from tests import onnx_net


def _model(seed=0):
  """conv1 3->16 -> ReLU -> conv2 16->16 -> ReLU -> GAP -> Flatten -> Gemm 16->10. conv1's
  filters 8..15 are scaled by 1e-3 (and their biases): the least important units of
  the whole model, by any group's own scale."""
  net = onnx_net.Net(seed)
  h = net.op("Relu", [net.conv("x", 3, 16)])
  h = net.op("Relu", [net.conv(h, 16, 16)])
  h = net.op("Flatten", [net.op("GlobalAveragePool", [h])])
  out = net.dense(h, (16, 10))
  inits = {i.name: i for i in net.inits}
  for name in ("conv1_w", "conv1_b"):
    v = numpy_helper.to_array(inits[name]).copy()
    v[8:] *= 1e-3
    inits[name].CopyFrom(numpy_helper.from_array(v, name))
  return net.model(out, [10])


class _ModelCase(parameterized.TestCase):
  """_model() saved once per test; _prune runs the pipeline on it with OPTIONS added."""
  OPTIONS: dict = {}

  def setUp(self):
    super().setUp()
    self.tmp = self.create_tempdir().full_path
    self.src = os.path.join(self.tmp, "in.onnx")
    onnx.save(_model(), self.src)

  def _prune(self, **kw):
    return pipeline.prune(self.src, os.path.join(self.tmp, "out.onnx"),
                          pipeline.Options(overwrite=True, **self.OPTIONS, **kw)).to_json()


class BudgetTest(_ModelCase):

  def _kept(self, doc):
    return {g["sources"][0]: g["channels_after"] for g in doc["groups"]}

  def test_global_ranking_takes_the_planted_channels_first(self):
    doc = self._prune(ratio=0.25, allocation="global")       # 8 of the 32 units
    self.assertEqual(self._kept(doc), {"conv1": 8})         # conv2 is not cut at all
    self.assertTrue(doc["verify"]["passed"])
    self.assertEqual(doc["budget"]["allocation"], "global")
    uniform = self._prune(ratio=0.25)
    self.assertEqual(self._kept(uniform), {"conv1": 12, "conv2": 12})

  def test_global_keeps_a_tenth_of_every_group(self):
    doc = self._prune(ratio=0.95, allocation="global")
    self.assertEqual(set(self._kept(doc).values()), {2})    # ceil(0.1 * 16)

  @parameterized.parameters(("uniform", "target_flops", 0.5), ("global", "target_flops", 0.4),
                            ("uniform", "target_params", 0.6), ("global", "target_params", 0.3))
  def test_budget_is_met_by_the_least_pruning(self, how, target, value):
    doc = self._prune(allocation=how, **{target: value})
    what = target.split("_")[1]
    kept = doc["budget"][f"{what}_kept"]
    self.assertLessEqual(kept, value)
    self.assertAlmostEqual(doc[f"{what}_after"] / doc[f"{what}_before"], kept, places=5)
    self.assertTrue(doc["verify"]["passed"])
    if how == "uniform":
      # The least pruning that meets it: the next smaller ratio goes over.
      less = self._prune(ratio=doc["ratio"] - 0.001)
      self.assertGreater(less[f"{what}_after"] / less[f"{what}_before"], value)
    else:
      self.assertGreater(kept, value - 0.1)   # one unit of a 16-wide group at most

  def test_impossible_budget(self):
    with self.assertRaisesRegex(errors.UsageError, r"--target_flops=0.001 cannot be met"):
      self._prune(target_flops=0.001, allocation="global")

  def test_uniform_budget_keeps_a_tenth_of_every_group(self):
    # Regression: the uniform search went up to ratio 0.999, one channel in every
    # group, and --mode=mixed at 3x on the built-in model at batch 1 wrote a
    # constant classifier (10.00 % top-1) that way. A budget only one channel per
    # group meets is now refused, as under global and latency allocation.
    tenth = self._prune(ratio=0.9)               # 2 of 16 in both groups
    self.assertEqual(set(self._kept(tenth).values()), {2})
    floor = tenth["flops_after"] / tenth["flops_before"]
    out = os.path.join(self.tmp, "out.onnx")
    if os.path.exists(out):
      os.remove(out)
    with self.assertRaisesRegex(errors.UsageError, rf"--target_flops={floor * 0.8:g} cannot be "
                                r"met: .*may remove keeps"):
      self._prune(target_flops=floor * 0.8)
    self.assertFalse(os.path.exists(out))
    doc = self._prune(target_flops=floor * 1.05)
    self.assertGreaterEqual(min(self._kept(doc).values()), 2)
    self.assertTrue(doc["verify"]["passed"])


def _flops(model):
  fmt = formats.for_name(formats.ONNX)
  return cost.measure(fmt.adapter.to_view(model), fmt.ops).flops


class _FlopsSession:
  """Times a candidate as its FLOPs (a microsecond each): no timing noise."""
  device_label = "FLOPs as time"

  def __init__(self, model):
    self.base, self.measured = _flops(model), 0

  def measure(self, candidate):
    self.measured += 1
    f = _flops(candidate)
    s = self.base / f
    return latency.Measured(s, s, s, f / 1e3, self.base / 1e3)


class _FlopsProbe(latency.Probe):

  def session(self, model):
    return _FlopsSession(model)


class LatencyBudgetTest(_ModelCase):
  OPTIONS = {"latency": _FlopsProbe()}

  @parameterized.parameters("uniform", "global")
  def test_speedup_is_met_by_the_least_pruning(self, how):
    doc = self._prune(allocation=how, target_speedup=2.0)
    b = doc["budget"]
    self.assertEqual((b["target"], b["target_value"]), ("speedup", 2.0))
    self.assertGreaterEqual(b["measured_speedup"], 2.0)
    self.assertAlmostEqual(b["measured_speedup"], doc["flops_before"] / doc["flops_after"],
                           places=3)
    self.assertGreater(b["candidates_timed"], 3)
    self.assertTrue(doc["verify"]["passed"])
    if how == "uniform":
      less = self._prune(ratio=doc["ratio"] - 0.001)
      self.assertLess(less["flops_before"] / less["flops_after"], 2.0)

  def test_latency_ms_is_met(self):
    base = self._prune(ratio=0.0)["flops_before"] / 1e3
    doc = self._prune(target_latency_ms=0.6 * base)
    self.assertLessEqual(doc["budget"]["latency_ms"], 0.6 * base)
    self.assertAlmostEqual(doc["budget"]["original_latency_ms"], base)

  def test_impossible_latency_budgets(self):
    with self.assertRaisesRegex(errors.UsageError, r"--target_speedup=1000 cannot be met: "
                                r"removing all that --allocation=uniform may remove measures"):
      self._prune(target_speedup=1000)
    with self.assertRaisesRegex(errors.UsageError, "the original already runs in"):
      self._prune(target_latency_ms=1e9)
    with self.assertRaisesRegex(errors.UsageError, "needs the benchmark"):
      pipeline.prune(self.src, os.path.join(self.tmp, "o.onnx"),
                     pipeline.Options(target_speedup=2.0))
    for kw, message in (({"target_speedup": 2.0, "target_flops": 0.5}, "give one budget"),
                        ({"target_speedup": 0.5}, "give a speedup above 1"),
                        ({"target_latency_ms": -1.0}, "give a positive latency")):
      with self.assertRaisesRegex(errors.UsageError, message):
        self._prune(**kw)


class LayerBudgetTest(_ModelCase):
  """--mode=layer with a measured budget: _model's 16 -> 16 convolution is the one
  removable layer (made the identity)."""
  OPTIONS = {"latency": _FlopsProbe(), "mode": "layer"}

  def test_speedup_removes_the_layer(self):
    doc = self._prune(target_speedup=1.2)
    b, lay = doc["budget"], doc["layers"]
    self.assertEqual((lay["removable_layers"], lay["removed"]), (1, 1))
    self.assertGreaterEqual(b["measured_speedup"], 1.2)
    self.assertAlmostEqual(b["measured_speedup"], doc["flops_before"] / doc["flops_after"],
                           places=3)
    self.assertTrue(doc["verify"]["passed"])

  def test_unmet_and_met_already(self):
    with self.assertRaisesRegex(errors.UsageError, r"--target_speedup=1000 cannot be met: "
                                r"removing all 1 removable layers and blocks measures"):
      self._prune(target_speedup=1000)
    with self.assertRaisesRegex(errors.UsageError, "the original already runs in"):
      self._prune(target_latency_ms=1e9)


def _near_identity_model():
  """_model with conv2 (16 -> 16, after a ReLU) the identity kernel plus 1e-4 noise
  and no bias: making it the identity changes almost nothing, cutting channels
  does."""
  model = _model()
  rng = np.random.default_rng(4)
  for init in model.graph.initializer:
    if init.name == "conv2_w":
      w = np.zeros((16, 16, 3, 3), np.float32)
      w[np.arange(16), np.arange(16), 1, 1] = 1.0
      w += 1e-4 * rng.standard_normal(w.shape).astype(np.float32)
      init.CopyFrom(numpy_helper.from_array(w, init.name))
    elif init.name == "conv2_b":
      init.CopyFrom(numpy_helper.from_array(np.zeros(16, np.float32), init.name))
  return model


class MixedBudgetTest(parameterized.TestCase):
  """--mode=mixed: for each count of removed layers, the filters for the rest of
  the budget; the candidate whose outputs lose least of the original's (an affine
  probe on calibration samples) wins, and both stages pass their oracle."""

  def setUp(self):
    super().setUp()
    self.tmp = self.create_tempdir().full_path
    self.data = os.path.join(self.tmp, "calib.npz")
    np.savez(self.data, x=np.abs(np.random.default_rng(0).standard_normal(
        (96, 8, 8, 3))).astype(np.float32))   # images, NHWC

  def _prune(self, model, **kw):
    src = os.path.join(self.tmp, "in.onnx")
    onnx.save(model, src)
    return pipeline.prune(src, os.path.join(self.tmp, "out.onnx"), pipeline.Options(
        mode="mixed", overwrite=True, latency=_FlopsProbe(),
        calibration=samples_lib.Spec(self.data, samples=64, holdout=32), **kw)).to_json()

  def test_near_identity_layer_goes_instead_of_filters(self):
    doc = self._prune(_near_identity_model(), target_speedup=2.0)
    lay, b = doc["layers"], doc["budget"]
    self.assertEqual([c["layers_removed"] for c in lay["candidates"]], [0, 1])
    self.assertEqual(lay["removed"], 1)
    lost = {c["layers_removed"]: c["output_lost"] for c in lay["candidates"]}
    self.assertLess(lost[1], 0.05, lost)
    self.assertGreater(lost[0], 3 * lost[1])
    self.assertTrue(lay["layers_verify"]["passed"])
    self.assertGreaterEqual(b["measured_speedup"], 2.0)
    self.assertAlmostEqual(b["measured_speedup"], doc["flops_before"] / doc["flops_after"],
                           places=3)

  def test_filters_win_where_the_layer_matters(self):
    doc = self._prune(_model(), target_flops=0.7)
    lay = doc["layers"]
    best = min(lay["candidates"], key=lambda c: c["output_lost"])
    self.assertEqual(lay["removed"], best["layers_removed"])
    self.assertLessEqual(doc["budget"]["flops_kept"], 0.7)
    self.assertTrue(doc["verify"]["passed"])
    # The layer costs most of the FLOPs and is far from the identity: the planted
    # unimportant channels of conv1 go instead.
    self.assertEqual(lay["removed"], 0)
    self.assertGreater(doc["groups_pruned"], 0)

  def test_short_recovery_probe_chooses_where_recovery_is_asked(self):
    """With a recovery that has a probe, every candidate is recovered briefly and the
    one agreeing most with the original afterwards wins, not the one losing least of
    its outputs before recovery (the fake probe below prefers most layers removed)."""
    src = os.path.join(os.path.dirname(__file__), "..", "models", "resnet", "fmnist_resnet_bn.pb")
    data = os.path.join(self.tmp, "calib28.npz")
    np.savez(data, x=np.random.default_rng(0).uniform(0, 1, (96, 28, 28, 1)).astype(np.float32))
    calibration = samples_lib.Spec(data, samples=64, holdout=32)
    out = os.path.join(self.tmp, "out.pb")
    plain = pipeline.prune(src, out, pipeline.Options(
        mode="mixed", target_flops=0.3, calibration=calibration)).to_json()["layers"]
    self.assertEqual(plain["chosen_by"], layer_modes.OUTPUT_LOST)
    self.assertTrue(all("probe_agreement" not in c for c in plain["candidates"]))
    recovery = _ProbeByLayersRemoved()
    doc = pipeline.prune(src, out, pipeline.Options(
        mode="mixed", target_flops=0.3, calibration=calibration, recover=recovery,
        overwrite=True)).to_json()
    lay = doc["layers"]
    self.assertEqual(lay["chosen_by"], layer_modes.PROBED)
    tried = [c for c in lay["candidates"] if "output_lost" in c]
    self.assertGreater(len(tried), 1)
    self.assertEqual(len(recovery.probed), len(tried))
    for c in tried:
      self.assertEqual(c["probe_steps"], 7)
    best = max(tried, key=lambda c: c["probe_agreement"])
    self.assertEqual(lay["removed"], best["layers_removed"])
    # Without the probe another candidate wins: the probe decided.
    self.assertNotEqual(plain["removed"], lay["removed"])
    self.assertEqual(plain["removed"], min(tried, key=lambda c: c["output_lost"])["layers_removed"])
    self.assertTrue(doc["verify"]["passed"])
    self.assertLessEqual(doc["budget"]["flops_kept"], 0.3)

  def test_probe_error(self):
    rng = np.random.default_rng(1)
    ref = rng.standard_normal((300, 10))
    scaled = 3.0 * ref @ rng.standard_normal((10, 10)) + 5.0     # an affine function of ref
    noise = rng.standard_normal((300, 10))
    self.assertLess(agreement.probe_error(ref[:200], scaled[:200], ref[200:], scaled[200:]),
                    1e-3)
    self.assertGreater(agreement.probe_error(ref[:200], noise[:200], ref[200:], noise[200:]),
                       0.95)
    half = np.concatenate([ref[:, :5], noise[:, 5:]], axis=1)        # half of it left
    self.assertAlmostEqual(agreement.probe_error(ref[:200], half[:200], ref[200:], half[200:]),
                           np.sqrt(0.5), delta=0.1)

  def test_refusals(self):
    src = os.path.join(self.tmp, "in.onnx")
    onnx.save(_model(), src)
    out = os.path.join(self.tmp, "o.onnx")
    calib = samples_lib.Spec(self.data, samples=64, holdout=32)
    for kw, message in (
        ({"ratio": 0.5}, "--mode=mixed chooses layers and filters together for a budget: give"),
        ({"target_flops": 0.5}, "--mode=mixed compares its candidates .* give "
                                "--calibration_data"),
        ({"target_flops": 0.5, "calibration": calib, "steps": 2}, "--steps with it is not built"),
        ({"target_flops": 0.0001, "calibration": calib},
         "--target_flops=0.0001 cannot be met by --mode=mixed")):
      with self.assertRaisesRegex(errors.UsageError, message, msg=str(kw)):
        pipeline.prune(src, out, pipeline.Options(mode="mixed", **kw))
    self.assertFalse(os.path.exists(out))


class _ProbeByLayersRemoved:
  """A recovery whose probe scores a candidate by the convolutions it lacks (more
  removed, higher agreement), and which changes nothing."""

  checkpoint_dir, grows, probe_steps = None, False, 7
  options = types.SimpleNamespace(method="distill")

  def __init__(self):
    self.probed = []

  def check(self):
    pass

  def probe(self, original, pruned):
    convs = lambda m: sum(n.op == "Conv2D" for n in m.graph_def.node)
    self.probed.append(convs(pruned))
    return 1.0 - convs(pruned) / (convs(original) + 1.0), {}

  def __call__(self, original, pruned, kept, checkpoint_dir, step=1):
    return pruned, {"method": "none (test)"}


class _LayerTime:
  """A model's "latency": each linear layer costs weight x input width x output
  width (ms), plus a fixed overhead; deterministic, so the latency allocation's
  prediction, measurement and refinement can be checked exactly."""

  def __init__(self, weights, overhead=0.0):
    self.weights, self.overhead = weights, overhead

  def layers(self, view):
    fmt = formats.for_name(formats.ONNX)
    out = []
    for node in view.nodes:
      lin = fmt.ops.linear(view, node)
      if lin is not None:
        w = view.constants[lin.weight]
        out.append((node, int(w.shape[lin.out_axis]), lin.fan_in * lin.groups))
    return out

  def total(self, model):
    view = formats.for_name(formats.ONNX).adapter.to_view(model)
    return self.overhead + sum(self.weights[n.name] * cin * cout
                               for n, cout, cin in self.layers(view))


class _LayerTimeSession:
  device_label = "layer widths as time"

  def __init__(self, cost, model):
    self.cost, self.base, self.measured = cost, cost.total(model), 0

  def measure(self, candidate):
    self.measured += 1
    t = self.cost.total(candidate)
    return latency.Measured(self.base / t, self.base / t, self.base / t, t, self.base)


class _CliffSession(_LayerTimeSession):
  """Measured speed with a cliff, as when a kernel changes with the widths: below a
  layer-time speedup of 1.4 nothing is gained, above it 2.2x."""

  def measure(self, candidate):
    m = super().measure(candidate)
    s = 2.2 if m.speedup >= 1.4 else 1.0
    return latency.Measured(s, s, s, self.base / s, self.base)


class _LayerTimeProbe(latency.Probe):
  """Profiles and times with _LayerTime; the profile adds `profile_overhead` ms to
  every layer at every width (as timing a layer alone does), which the session's
  whole-model time does not pay."""

  def __init__(self, cost, session=None, profile_overhead=0.0):
    super().__init__()
    object.__setattr__(self, "cost", cost)
    object.__setattr__(self, "session_type", session or _LayerTimeSession)
    object.__setattr__(self, "profile_overhead", profile_overhead)

  def profile(self, graph, ops, fmt):
    from graph_prune.bench import layer_latency  # pylint: disable=g-import-not-at-top
    layers, costs = [], []
    for node, cout, cin in self.cost.layers(graph):
      layers.append(layer_latency.Layer(node.name, node.inputs[0], node.outputs[0], cin, cout,
                                        0, None, "test"))
      costs.append(lambda a, b, w=self.cost.weights[node.name], o=self.profile_overhead:
                   w * a * b + o)
    return layer_latency.Profile(tuple(layers), tuple(costs), {"fake": True})

  def session(self, model):
    return self.session_type(self.cost, model)


class LatencyAllocationTest(_ModelCase):
  """--allocation=latency with a deterministic layer-time model."""

  def _latency(self, weights, overhead=0.0, session=None, profile_overhead=0.0, **kw):
    return self._prune(allocation="latency", latency=_LayerTimeProbe(
        _LayerTime(weights, overhead), session, profile_overhead), **kw)

  def _kept(self, doc):
    return {g["sources"][0]: g["channels_after"] for g in doc["groups"]}

  def test_exact_prediction_meets_the_target_first_time(self):
    doc = self._latency({"conv1": 1.0, "conv2": 1.0, "gemm1": 1.0}, target_speedup=2.0)
    b = doc["budget"]
    self.assertEqual(b["allocation"], "latency")
    self.assertLen(b["refinements"], 1)
    self.assertAlmostEqual(b["predicted_speedup"], b["measured_speedup"], places=3)
    self.assertLessEqual(abs(b["measured_speedup"] / 2.0 - 1), 0.05)
    self.assertGreaterEqual(b["measured_speedup"], 2.0)
    self.assertTrue(doc["verify"]["passed"])

  def test_expensive_layer_decides_what_goes(self):
    # conv1's planted filters are the least important of the model, and a FLOPs
    # budget under a global ranking takes them first; but when the dense layer,
    # which reads conv2's channels, costs a thousand times more per width, the
    # milliseconds are in conv2's group, and that is what latency allocation cuts.
    doc = self._latency({"conv1": 1.0, "conv2": 1.0, "gemm1": 1000.0}, target_speedup=2.0)
    kept = self._kept(doc)
    self.assertLess(kept["conv2"], 10)
    self.assertGreater(kept.get("conv1", 16), kept["conv2"])
    flops = self._prune(allocation="global", target_flops=0.62)
    self.assertLess(self._kept(flops)["conv1"], self._kept(flops).get("conv2", 16))

  def test_overhead_is_refined_away(self):
    # A fixed 10 ms the layer model does not see: the first allocation falls short
    # of the measured target, the refinements aim higher until within 5 %.
    doc = self._latency({"conv1": 0.05, "conv2": 0.05, "gemm1": 0.05}, overhead=10.0,
                        target_speedup=1.5)
    b = doc["budget"]
    self.assertGreater(len(b["refinements"]), 1, b["refinements"])
    first = b["refinements"][0]
    self.assertLess(first["measured_speedup"], first["predicted_speedup"])
    self.assertLessEqual(abs(b["measured_speedup"] / 1.5 - 1), 0.05)

  def test_a_cliff_in_measured_speed_ends_on_a_candidate_that_meets_the_target(self):
    # Aiming at 1.5 measures 2.2 (over), scaling the aim down by the miss measures
    # 1.0 (under), and scaling by the miss again would swing between the two; the
    # bracket is halved instead, and a candidate that meets the target wins over
    # a closer one that does not.
    doc = self._latency({"conv1": 1.0, "conv2": 1.0, "gemm1": 1.0}, session=_CliffSession,
                        target_speedup=1.5)
    b = doc["budget"]
    self.assertEqual(b["measured_speedup"], 2.2)
    measured = [t["measured_speedup"] for t in b["refinements"]]
    self.assertIn(1.0, measured)
    aims = [t["aimed_speedup"] for t in b["refinements"]]
    self.assertLess(max(aims[2:] or [0]), aims[0])          # bisected below the first aim
    self.assertGreater(min(aims[2:] or [9]), aims[1])       # ... and above the second

  def test_pessimistic_layer_model_ends_on_the_mildest_candidate_that_meets(self):
    # Regression (the built-in model at 2.9x measured 2.96x with every group at the
    # floor, 1.7 % of its FLOPs kept, while uniform widths kept 6.4 % at 3.0x): each
    # profiled layer pays an overhead that the whole model does not, so the layer
    # model predicts too little speed and the first aim removes far more than the
    # target needs. Milder aims are measured, and the mildest that meets the target
    # wins.
    weights = {"conv1": 1.0, "conv2": 1.0, "gemm1": 1.0}
    # The whole model's time: 300 ms fixed plus the layers' (464 ms at full width,
    # 30 ms with every group at the floor): near the floor it is flat, 2.31x there.
    doc = self._latency(weights, overhead=300.0, profile_overhead=150.0, target_speedup=2.21)
    b = doc["budget"]
    tries = b["refinements"]
    first = tries[0]   # the floor: the layer model predicts 1.9x at most
    self.assertGreater(first["measured_speedup"], 2.21)
    self.assertLess(first["measured_speedup"], 2.21 * 1.05)
    self.assertGreater(first["measured_speedup"], 1.05 * first["predicted_speedup"])
    self.assertGreaterEqual(b["measured_speedup"], 2.21)
    self.assertLess(b["measured_speedup"], first["measured_speedup"])
    meeting = [t for t in tries if t["measured_speedup"] >= 2.21]
    self.assertEqual(b["measured_speedup"], min(meeting, key=lambda t: t["aimed_speedup"])[
        "measured_speedup"])
    self.assertTrue(doc["verify"]["passed"])
    # Without the overhead the first aim is exact and nothing is refined.
    self.assertLen(self._latency(weights, target_speedup=2.0)["budget"]["refinements"], 1)

  def test_impossible_and_bad_requests(self):
    with self.assertRaisesRegex(errors.UsageError, r"--target_speedup=1000 cannot be met: "
                                r"removing all that --allocation=latency may remove"):
      self._latency({"conv1": 1.0, "conv2": 1.0, "gemm1": 1.0}, target_speedup=1000)
    with self.assertRaisesRegex(errors.UsageError, "takes a latency budget instead of --ratio"):
      self._latency({"conv1": 1.0}, ratio=0.5)
    with self.assertRaisesRegex(errors.UsageError, "not --target_flops"):
      self._latency({"conv1": 1.0}, target_flops=0.5)


class _BlockedTime(_LayerTime):
  """_LayerTime with every width rounded up to a block of 4 channels, as CPU kernels
  pad channels to their vector width: 9 channels cost what 12 do."""

  def total(self, model):
    view = formats.for_name(formats.ONNX).adapter.to_view(model)
    block = lambda n: -(-n // 4) * 4
    return self.overhead + sum(self.weights[n.name] * block(cin) * block(cout)
                               for n, cout, cin in self.layers(view))


class StaircaseTest(_ModelCase):
  """The uniform search for a measured budget on a model whose speed is a
  staircase in the widths."""

  def test_uniform_restores_whole_groups_to_land_near_the_target(self):
    # Regression (ResNet50 at 224, uniform, --target_speedup=1.5/2/3: the least
    # ratio that met the target measured 6-13 % faster, 3x at batch 32 3.33x
    # re-measured): here every group stepping from 8 to 9 channels (ratio 0.5 to
    # 0.499) costs a whole block of 4 in each, 3.32x to 1.54x. Against a target of
    # 1.9, ratio 0.5 is 75 % over; restoring conv2's group whole (the fewest FLOPs
    # per channel given back: it feeds the small dense layer, conv1's group feeds
    # conv2) measures 1.99x, 4.6 % over, and restoring conv1's too would miss.
    probe = _LayerTimeProbe(_BlockedTime({"conv1": 1.0, "conv2": 1.0, "gemm1": 0.01}))
    doc = self._prune(target_speedup=1.9, latency=probe)
    b = doc["budget"]
    self.assertEqual(doc["ratio"], 0.5)
    self.assertEqual(self._kept(doc), {"conv1": 8})          # conv2 left whole
    self.assertAlmostEqual(b["measured_speedup"], 321.92 / 161.92, places=3)
    self.assertEqual((b["groups_restored"], b["groups_cut_by_ratio"]), (1, 2))
    self.assertTrue(doc["verify"]["passed"])
    # A target that restoring either group misses keeps ratio 0.5 in both.
    doc = self._prune(target_speedup=3.0, latency=probe)
    self.assertEqual(self._kept(doc), {"conv1": 8, "conv2": 8})
    self.assertEqual(doc["budget"]["groups_restored"], 0)
    self.assertAlmostEqual(doc["budget"]["measured_speedup"], 321.92 / 96.96, places=3)

  def test_latency_allocation_restores_whole_groups_across_a_cliff(self):
    # Regression (ResNet50 at 224, batch 1, --allocation=latency --target_speedup=3:
    # in two of five runs every aim measured either short of 3x or 10-11 % over it,
    # and the search kept the mildest over, 3.32x in the command). Here the
    # allocation's candidates measure 2.26x or 3.71x against 2.5x; restoring conv1's
    # group whole, as the uniform search does, lands at 2.54x.
    probe = _LayerTimeProbe(_BlockedTime({"conv1": 1.0, "conv2": 0.3, "gemm1": 1.0}))
    doc = self._prune(allocation="latency", target_speedup=2.5, latency=probe)
    b = doc["budget"]
    tried = [t["measured_speedup"] for t in b["refinements"]]
    self.assertFalse([m for m in tried if 2.5 <= m <= 2.5 * 1.05], tried)
    self.assertGreater(max(tried), 2.5 * 1.05)
    self.assertEqual((b["groups_restored"], b["groups_cut_by_ratio"]), (1, 2))
    self.assertEqual(self._kept(doc), {"conv2": 4})
    self.assertGreaterEqual(b["measured_speedup"], 2.5)
    self.assertLess(b["measured_speedup"], 2.5 * 1.05)
    self.assertTrue(doc["verify"]["passed"])

  def _kept(self, doc):
    return {g["sources"][0]: g["channels_after"] for g in doc["groups"]}


class CommandTest(absltest.TestCase):

  def test_target_speedup_measured_on_this_machine(self):
    # The real timing: the built-in model under XLA on this CPU at batch 32; the
    # chosen plan's own measurement meets the target.
    tmp = self.create_tempdir().full_path
    src = os.path.join(binaries.ROOT, "models", "default", "fmnist_vgg_bn.pb")
    out, report = os.path.join(tmp, "out.pb"), os.path.join(tmp, "r.json")
    r = subprocess.run([*binaries.command("prune"), f"--in={src}", f"--out={out}",
                        "--target_speedup=1.5", "--batch_sizes=32", "--max_seconds=2",
                        "--target_rse=0.02", f"--report={report}"],
                       capture_output=True, text=True, env=binaries.env(), timeout=900,
                       check=False)
    self.assertEqual(r.returncode, 0, r.stderr[-2000:])
    b = json.load(open(report))["budget"]
    self.assertGreaterEqual(b["measured_speedup"], 1.5)
    self.assertEqual((b["batch"], b["xla"]), (32, True))
    self.assertIn("budget: 1.5x faster, measured", r.stdout)


  def test_bad_requests_one_line_exit_2(self):
    tmp = self.create_tempdir().full_path
    src, out = os.path.join(tmp, "in.onnx"), os.path.join(tmp, "out.onnx")
    onnx.save(_model(), src)
    for extra, message in (
        (["--target_flops=0.5", "--target_params=0.5"], "give one budget"),
        (["--target_flops=0.5", "--ratio=0.3"], "replaces --ratio"),
        (["--target_flops=1.5"], "give the fraction kept"),
        (["--target_params=0"], "give the fraction kept"),
        (["--allocation=knapsack"], "unknown --allocation 'knapsack'"),
        (["--target_flops=0.0001"], "cannot be met"),
        (["--target_speedup=2", "--batch_sizes=1,8"], "timed at one batch size"),
        (["--target_speedup=2", "--ratio=0.5"], "replaces --ratio")):
      r = subprocess.run([*binaries.command("prune"), f"--in={src}", f"--out={out}", *extra],
                         capture_output=True, text=True, env=binaries.env(), timeout=300,
                         check=False)
      self.assertEqual(r.returncode, 2, (extra, r.stderr[-1000:]))
      lines = [l for l in r.stderr.splitlines() if l.startswith("prune: ")]
      self.assertLen(lines, 1, r.stderr[-1000:])
      self.assertIn(message, lines[0])
      self.assertFalse(os.path.exists(out))
    r = subprocess.run([*binaries.command("prune"), f"--in={src}", f"--out={out}",
                        "--target_flops=0.5", "--allocation=global"], capture_output=True,
                       text=True, env=binaries.env(), timeout=300, check=False)
    self.assertEqual(r.returncode, 0, r.stderr[-1000:])
    self.assertIn("allocation: global", r.stdout)
    self.assertIn("budget: keep 0.5 of the flops", r.stdout)


if __name__ == "__main__":
  absltest.main()
