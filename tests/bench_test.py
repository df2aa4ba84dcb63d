"""The benchmark tool: structure and invariants of its report, not absolute times.

A VGG-style model (64x64 input, five 3x3 convolutions of 64-128 channels, so
that compute dominates) is frozen to a GraphDef, pruned at ratio 0.5 with the
pipeline, and the pruned model converted to ONNX with tf2onnx.
"""

import json
import math
import os
import random
import subprocess
import sys

from absl.testing import absltest
from absl.testing import parameterized
import keras
import numpy as np

import graph_prune
from graph_prune import errors
from graph_prune import pipeline
from graph_prune.adapters import tf_model
from graph_prune.bench import benchmark
from graph_prune.bench import latency
from graph_prune.bench import runners
from graph_prune.bench import timing
from tests import binaries
from tests import keras_zoo

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(graph_prune.__file__)))
_BENCH = os.path.join(_ROOT, "tools", "bench.py")
_SHORT = timing.Settings(warmup=1, min_runs=5, max_seconds=1.5)


def _vgg_style():
  keras.utils.set_random_seed(0)
  inputs = keras.Input((64, 64, 3))
  x = inputs
  for width in (64, 64, "pool", 128, 128, "pool", 128):
    if width == "pool":
      x = keras.layers.MaxPooling2D()(x)
    else:
      x = keras.layers.Conv2D(width, 3, padding="same", activation="relu")(x)
  x = keras.layers.GlobalAveragePooling2D()(x)
  return keras.Model(inputs, keras.layers.Dense(10)(x))


def _bench(*args):
  env = dict(os.environ, PYTHONPATH=_ROOT, TF_CPP_MIN_LOG_LEVEL="3")
  return subprocess.run([*binaries.command("bench"), *args], capture_output=True, text=True,
                        env=env, timeout=300, check=False)


class TimingTest(absltest.TestCase):
  """The loop and statistics with fake calls and a fake clock."""

  def test_percentiles(self):
    values = [float(v) for v in range(1, 11)]
    self.assertAlmostEqual(timing.percentile(values, 50), 5.5)
    self.assertAlmostEqual(timing.percentile(values, 10), 1.9)
    self.assertAlmostEqual(timing.percentile(values, 90), 9.1)
    self.assertEqual(timing.median_rse([2.0] * 10), 0.0)
    self.assertEqual(timing.median_rse([1.0, 2.0]), float("inf"))
    # Normal samples: the standard error of the median is sqrt(pi/2) sigma / sqrt(n).
    rng = random.Random(0)
    for n in (100, 10000):
      values = [rng.gauss(10.0, 1.0) for _ in range(n)]
      expected = math.sqrt(math.pi / 2) / math.sqrt(n) / 10.0
      self.assertBetween(timing.median_rse(values), 0.7 * expected, 1.3 * expected)

  def test_alternates_and_stops_when_converged(self):
    order, now = [], [0.0]

    def make(name, cost):
      def call():
        order.append(name)
        now[0] += cost
      return call

    settings = timing.Settings(warmup=2, min_runs=4, max_seconds=100.0)
    result = timing.measure([make("A", 0.3), make("B", 0.1)], settings, clock=lambda: now[0])
    # Warm-up calls first, then one call of each per round in a seeded shuffled
    # order; constant times converge at min_runs.
    self.assertEqual(order[:4], ["A", "A", "B", "B"])
    rounds = [order[i:i + 2] for i in range(4, len(order), 2)]
    self.assertLen(rounds, 4)
    self.assertTrue(all(sorted(r) == ["A", "B"] for r in rounds), rounds)
    self.assertTrue(result.converged)
    self.assertLen(result.times[0], 4)
    self.assertAlmostEqual(timing.speedup(result).median, 3.0)
    self.assertEqual(timing.speedup(result).n, 4)

  def test_order_within_rounds_is_shuffled(self):
    # Bug: a fixed A-then-B order made an identical copy look 1.35x faster, as the
    # second call of a round ran faster. With the order shuffled, an identical
    # copy comes out even, and the same seed gives the same order.
    def run(seed):
      now, position = [0.0], [0]

      def call():
        now[0] += 1.35 if position[0] % 2 == 0 else 1.0   # the first of a round is slower
        position[0] += 1
      settings = timing.Settings(warmup=0, min_runs=400, max_runs=400, max_seconds=1e9,
                                 seed=seed)
      return timing.measure([call, call], settings, clock=lambda: now[0])
    result = run(0)
    speedups = result.ratios[0]
    slower_first = sum(r > 1 for r in speedups) / len(speedups)
    self.assertBetween(slower_first, 0.4, 0.6)
    a, b = (sum(t) / len(t) for t in result.times)   # fixed order A-B: 1.35
    self.assertBetween(a / b, 0.97, 1.03)
    self.assertEqual(run(0).ratios, result.ratios)
    self.assertNotEqual(run(1).ratios, result.ratios)

  def test_budget_ends_the_loop(self):
    now, step = [0.0], [0]

    def call():  # alternating 1 s and 2 s: never within 1 % of a median
      step[0] += 1
      now[0] += 1.0 + step[0] % 2

    settings = timing.Settings(warmup=0, min_runs=3, max_seconds=30.0)
    result = timing.measure([call], settings, clock=lambda: now[0])
    self.assertFalse(result.converged)
    self.assertBetween(sum(result.times[0]), 30.0, 33.0)
    self.assertIsNone(timing.speedup(result))


class BenchTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    tmp = absltest.get_default_test_tmpdir()
    model = _vgg_style()
    graph_def, cls.input_name, cls.output_name = keras_zoo.freeze(model)
    cls.base = os.path.join(tmp, "vgg.pb")
    with open(cls.base, "wb") as f:
      f.write(graph_def.SerializeToString())
    cls.pruned = os.path.join(tmp, "vgg_pruned.pb")
    pipeline.prune(cls.base, cls.pruned, pipeline.Options(ratio=0.5, overwrite=True))
    cls.onnx = os.path.join(tmp, "vgg_pruned.onnx")
    import tf2onnx  # pylint: disable=g-import-not-at-top
    from graph_prune.adapters import tf_model  # pylint: disable=g-import-not-at-top
    pruned = tf_model.load(cls.pruned)
    tf2onnx.convert.from_graph_def(pruned.graph_def, input_names=list(pruned.inputs),
                                   output_names=list(pruned.outputs), opset=17,
                                   output_path=cls.onnx)
    cls.saved_model = keras_zoo.save_saved_model(model, os.path.join(tmp, "vgg_sm"))

  def _check_structure(self, doc, roles, batch_sizes):
    self.assertEqual(doc["schema"], benchmark.SCHEMA)
    for key in ("date", "device", "device_name", "xla", "versions", "settings", "models",
                "pairs"):
      self.assertIn(key, doc)
    self.assertEqual(set(doc["models"]), set(roles))
    for role in roles:
      m = doc["models"][role]
      self.assertEqual(m["const_bytes"], _disk_size(m["path"]))
      self.assertEqual(set(m["batches"]), {str(b) for b in batch_sizes})
      for b in batch_sizes:
        e = m["batches"][str(b)]
        # The model ran: one output of [batch, classes].
        self.assertEqual(e["output_shapes"], [[b, 10]])
        self.assertGreater(e["compile_s"], 0.0)
        lat = e["latency_ms"]
        self.assertGreaterEqual(lat["n"], _SHORT.min_runs)
        self.assertLessEqual(lat["p10"], lat["median"])
        self.assertLessEqual(lat["median"], lat["p90"])
        self.assertAlmostEqual(e["throughput"], b / lat["median"] * 1e3, delta=1e-6)
        for key in ("peak_bytes", "peak_method", "host_peak_bytes", "resident_bytes",
                    "converged"):
          self.assertIn(key, e)
    if "baseline" in roles:
      self.assertEqual(set(doc["pairs"]), {str(b) for b in batch_sizes})
      for b, pair in doc["pairs"].items():
        s = pair["speedup"]
        self.assertEqual(s["n"], doc["models"]["candidate"]["batches"][b]["latency_ms"]["n"])
        self.assertLessEqual(s["p10"], s["median"])
        self.assertLessEqual(s["median"], s["p90"])
    self.assertNotEmpty(benchmark.text(doc))

  def test_pruned_is_faster_than_original_under_xla_on_cpu(self):
    report = os.path.join(self.create_tempdir().full_path, "bench.json")
    doc = benchmark.run(benchmark.Options(
        model=self.pruned, baseline=self.base, batch_sizes=(1, 2), device="cpu", xla=True,
        timing=_SHORT, memory=True, memory_runs=1, report=report))
    self._check_structure(doc, ("baseline", "candidate"), (1, 2))
    self.assertEqual(doc["device"], "cpu:0")
    self.assertTrue(doc["xla"])
    for m in doc["models"].values():
      self.assertEqual((m["format"], m["runtime"]), ("graphdef", "tensorflow-xla"))
      self.assertEqual(m["inputs"], [{"name": self.input_name, "shape": [None, 64, 64, 3],
                                      "dtype": "float32"}])
      for e in m["batches"].values():
        self.assertGreater(e["peak_bytes"], 0)
        self.assertBetween(e["resident_bytes"], 1, e["peak_bytes"])
        self.assertIn(e["peak_method"], ("vmhwm_reset", "vmhwm_minus_rss"))
    models = doc["models"]
    self.assertLess(models["candidate"]["const_bytes"], models["baseline"]["const_bytes"] / 2)
    # About a quarter of the multiply-adds: clearly faster, whatever the load.
    for b in ("1", "2"):
      self.assertGreater(doc["pairs"][b]["speedup"]["median"], 1.3, doc["pairs"][b])
    with open(report, encoding="utf-8") as f:
      self.assertEqual(json.load(f), json.loads(json.dumps(doc)))

  def test_latency_session_feeds_large_weights_as_arguments(self):
    # Regression: XLA keeps every executable it compiled for the life of the process,
    # and one compiled with its weights as constants holds several copies of them: a
    # --target_speedup=2 run on VGG16 at 224x224 peaked at 17 GB over its 11 timed
    # candidates. The latency session of a large original feeds the linear layers'
    # weights as arguments instead (3.8 GB, and twice as fast).
    base, pruned = runners.load(self.base), runners.load(self.pruned)
    device = runners.resolve_device("cpu", base.format)
    light, names, arrays = tf_model.weights_as_feeds(base.model.graph_def)
    kinds = {n.name: n.op for n in light.node}
    self.assertNotEmpty(names)
    self.assertEqual({kinds[t.split(":")[0]] for t in names}, {"Placeholder"})
    consts = sum(len(n.attr["value"].tensor.tensor_content) for n in base.model.graph_def.node
                 if n.op == "Const")
    self.assertGreater(sum(a.nbytes for a in arrays), 0.95 * consts)
    fed = runners.build(base, device, True, feed_weights=True)
    plain = runners.build(base, device, True)
    self.assertEqual(fed.inputs, plain.inputs)   # the weights are not the model's inputs
    np.testing.assert_allclose(fed.bind(2, 0).fetch()[0], plain.bind(2, 0).fetch()[0],
                               rtol=1e-4, atol=1e-5)
    probe = latency.Probe(device="cpu", batch=2, settings=_SHORT, feed_weights_bytes=0)
    session = probe.session(base.model)
    self.assertTrue(session.feed_weights)
    self.assertGreater(session.measure(pruned.model).speedup, 1.3)
    # This model is small (1 MB): by default its weights stay constants.
    self.assertFalse(latency.Probe(device="cpu", batch=2).session(base.model).feed_weights)

  def test_model_against_itself_onnx_runtime(self):
    doc = benchmark.run(benchmark.Options(
        model=self.onnx, baseline=self.onnx, batch_sizes=(4,), device="auto",
        timing=timing.Settings(warmup=2, min_runs=20, max_seconds=2.0), memory=True))
    self._check_structure(doc, ("baseline", "candidate"), (4,))
    self.assertEqual(doc["models"]["candidate"]["runtime"], "onnxruntime")
    self.assertIn("onnxruntime", doc["versions"])
    self.assertBetween(doc["pairs"]["4"]["speedup"]["median"], 0.8, 1.25,
                       json.dumps([doc["pairs"], {r: m["batches"]["4"]["latency_ms"]
                                                  for r, m in doc["models"].items()}]))
    for m in doc["models"].values():
      self.assertGreater(m["batches"]["4"]["peak_bytes"], 0)

  def test_saved_model_plain_tensorflow(self):
    doc = benchmark.run(benchmark.Options(
        model=self.saved_model, batch_sizes=(3,), device="cpu", xla=False, timing=_SHORT,
        memory=False))
    self._check_structure(doc, ("candidate",), (3,))
    m = doc["models"]["candidate"]
    self.assertEqual((m["format"], m["runtime"]), ("saved_model", "tensorflow"))
    self.assertEqual(doc["pairs"], {})
    self.assertIsNone(m["batches"]["3"]["peak_bytes"])

  def test_fixed_batch_size_is_a_usage_error(self):
    from graph_prune.adapters import tf_model  # pylint: disable=g-import-not-at-top
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    with tf.Graph().as_default() as g:
      x = tf.compat.v1.placeholder(tf.float32, [4, 3], name="x")
      tf.identity(x * 2.0, name="y")
    path = os.path.join(self.create_tempdir().full_path, "fixed.pb")
    tf_model.write(tf_model.TFModel(tf_model.GRAPHDEF, g.as_graph_def(), ("x:0",), ("y:0",)),
                   path)
    with self.assertRaisesRegex(errors.UsageError, "fixed batch size of 4"):
      benchmark.run(benchmark.Options(model=path, batch_sizes=(1,), device="cpu",
                                      memory=False))

  def test_command_line(self):
    report = os.path.join(self.create_tempdir().full_path, "r.json")
    r = _bench(f"--model={self.onnx}", f"--baseline={self.onnx}", "--batch_sizes=1,2",
               "--max_seconds=0.3", "--nomemory", f"--report={report}")
    self.assertEqual(r.returncode, 0, r.stderr[-2000:])
    self.assertIn("median ms", r.stdout)
    self.assertIn("speedup = baseline time / candidate time", r.stdout)
    self.assertIn("bench: batch 2: timing", r.stderr)  # progress on stderr
    with open(report, encoding="utf-8") as f:
      self.assertEqual(sorted(json.load(f)["pairs"]), ["1", "2"])

  @parameterized.named_parameters(
      ("missing_model", ["--model=/no/such/model.pb"], "does not exist"),
      ("missing_baseline", ["--model={onnx}", "--baseline=/no/such.onnx"], "does not exist"),
      ("not_a_model", ["--model={notes}"], "is not a TensorFlow GraphDef"),
      ("not_onnx", ["--model={fake_onnx}"], "is not an ONNX model"),
      ("zero_batch", ["--model={onnx}", "--batch_sizes=1,0"], "not a positive integer"),
      ("word_batch", ["--model={onnx}", "--batch_sizes=8,x"], "not a positive integer"),
      ("negative_batch", ["--model={onnx}", "--batch_sizes=-1"], "not a positive integer"),
      ("unknown_device", ["--model={onnx}", "--device=fpga"], "unknown device"),
      ("onnx_on_tpu", ["--model={onnx}", "--device=tpu"], "no TPU provider"),
  )
  def test_bad_input(self, args, needle):
    tmp = self.create_tempdir().full_path
    notes = os.path.join(tmp, "notes.pb")
    fake_onnx = os.path.join(tmp, "notes.onnx")
    for path in (notes, fake_onnx):
      with open(path, "w", encoding="utf-8") as f:
        f.write("this is not a model\n")
    r = _bench(*[a.format(onnx=self.onnx, notes=notes, fake_onnx=fake_onnx) for a in args])
    self.assertEqual(r.returncode, 2, r.stderr[-2000:])
    lines = [l for l in r.stderr.splitlines() if l.startswith("bench: ")]
    self.assertLen(lines, 1, r.stderr[-2000:])
    self.assertTrue(lines[0].startswith("bench: error: "), lines[0])
    self.assertIn(needle, lines[0])
    self.assertNotIn("Traceback", r.stderr)
    self.assertEqual(r.stdout, "")


def _disk_size(path):
  if os.path.isdir(path):
    return sum(os.path.getsize(os.path.join(root, f))
               for root, _, files in os.walk(path) for f in files)
  return os.path.getsize(path)


if __name__ == "__main__":
  absltest.main()
