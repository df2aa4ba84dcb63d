"""Recovery after pruning: the trainable round trip, distillation, fine-tuning,
batch-norm recalibration, increments, strategies, augmented batches, training with
batch statistics and with dropout, resumption and bad input.

The model is the built-in default one (trained on Fashion-MNIST); the data is the
Fashion-MNIST training set from the Debian package.
"""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from unittest import mock

from absl.testing import absltest
import numpy as np

import graph_prune
from graph_prune import errors
from graph_prune import pipeline
from graph_prune.adapters import tf_model
from graph_prune.adapters import tf_trainable
from graph_prune.data import preprocess
from graph_prune.ops import tf_ops
from graph_prune.recover import augment
from graph_prune.recover import batch_stats
from graph_prune.recover import calibrate
from graph_prune.recover import data as recover_data
from graph_prune.recover import dropout
from graph_prune.recover import options as recover_options
from graph_prune.recover import recover
from graph_prune.recover import train
from tests import binaries
from tests import keras_zoo

tf = tf_model.tf

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(graph_prune.__file__)))
_PB = os.path.join(_ROOT, "models", "default", "fmnist_vgg_bn.pb")
_SM = os.path.join(_ROOT, "models", "default", "fmnist_vgg_bn_savedmodel")
_DATA = "fashion-mnist:train"
_SCALE = preprocess.Preprocess(scale=1 / 255)
_FAST = recover_options.Options(data=_DATA, preprocess=_SCALE, holdout_samples=1000,
                                calibration_samples=1024, log_every=50)


def _cli(*args, timeout=600):
  env = dict(os.environ, PYTHONPATH=_ROOT, TF_CPP_MIN_LOG_LEVEL="3", TF_DETERMINISTIC_OPS="1")
  return subprocess.run([*binaries.command("prune"), *args],
                        capture_output=True, text=True, env=env, timeout=timeout, check=False)


def _error_lines(stderr):
  return [l for l in stderr.splitlines() if l.startswith("prune: ")]


def _test_images(n=1000):
  from graph_prune.data import idx  # pylint: disable=g-import-not-at-top
  x, _ = idx.load_split(idx.FASHION_MNIST_DIR, "test")  # float32 [N, 28, 28, 1] in [0, 1]
  return x[:n]


def _top1(model, x):
  runner = tf_model.Runner(model)
  try:
    return np.argmax(runner([x])[0], axis=-1)
  finally:
    runner.close()


class TrainableRoundTripTest(absltest.TestCase):
  """Constants -> variables -> constants is exact before any training step."""

  def _check(self, model, x):
    trainable = tf_trainable.Trainable(model)
    self.assertGreater(len(trainable.weights), 3)
    back = trainable.model()
    self.assertEqual(back.graph_def.SerializeToString(deterministic=True),
                     model.graph_def.SerializeToString(deterministic=True))
    runner = tf_model.Runner(model)
    try:
      frozen = runner([x])
    finally:
      runner.close()
    traced = [t.numpy() for t in trainable(tf.constant(x))]
    for a, b in zip(frozen, traced):
      np.testing.assert_array_equal(a, b)

  def test_default_model(self):
    self._check(tf_model.normalise(tf_model.load(_PB)), _test_images(64))

  def test_pruned_keras_model_with_softmax_head(self):
    model, _ = keras_zoo.make_planted_model(seed=3)
    gd, inp, out = keras_zoo.freeze(model)
    tfm = tf_model.normalise(tf_model.TFModel(tf_model.GRAPHDEF, gd, (inp,), (out,)))
    prepared = pipeline.prepare_model(pipeline.format_for("m.pb"), tfm)
    pruned = pipeline.rewrite(prepared, pipeline.make_plan(prepared, pipeline.Options()))
    x = keras_zoo.sample_input("planted", batch=4)
    self._check(pruned, x)
    # Keras applications end in softmax: distillation must see the logits before it.
    logits = tf_trainable.logits_tensor(pruned)
    nodes = {n.name: n for n in pruned.graph_def.node}
    node = nodes[pruned.outputs[0].split(":")[0]]
    while node.op == "Identity":
      node = nodes[node.input[0].split(":")[0]]
    self.assertEqual(node.op, "Softmax")
    self.assertEqual(logits, tf_model.tensor_name(node.input[0]))
    self.assertEqual(nodes[logits.split(":")[0]].op, "BiasAdd")

  def test_writes_changed_values_only(self):
    model = tf_model.normalise(tf_model.load(_PB))
    trainable = tf_trainable.Trainable(model)
    name = trainable.weight_names[0]
    value = trainable.values()[name]
    trainable.assign({name: value * 2.0})
    back = trainable.model()
    got = {n.name: n for n in back.graph_def.node}[name.split(":")[0]]
    np.testing.assert_array_equal(tf.make_ndarray(got.attr["value"].tensor), value * 2.0)
    self.assertEqual(len(back.graph_def.node), len(model.graph_def.node))


class RecoveryTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = absltest.get_default_test_tmpdir()
    cls.x = _test_images(1000)
    cls.original = tf_model.normalise(tf_model.load(_PB))
    cls.teacher = _top1(cls.original, cls.x)
    out = os.path.join(cls.tmp, "unrecovered.pb")
    pipeline.prune(_PB, out, pipeline.Options(ratio=0.5, overwrite=True))
    cls.unrecovered = np.mean(_top1(tf_model.load(out), cls.x) == cls.teacher)

  def _prune(self, name, options, source=_PB, **kw):
    out = os.path.join(self.tmp, name)
    doc = pipeline.prune(source, out, pipeline.Options(
        ratio=0.5, overwrite=True, recover=recover.Recovery(options), **kw))
    return out, doc

  def _agreement(self, path):
    return float(np.mean(_top1(tf_model.load(path), self.x) == self.teacher))

  def test_distillation_raises_agreement(self):
    out, doc = self._prune("distilled.pb", dataclasses.replace(_FAST, train_steps=200))
    rec = doc["recovery"]
    self.assertEqual(rec["method"], "distill")
    self.assertGreater(rec["holdout_agreement_after"], rec["holdout_agreement_before"] + 0.4)
    # Measured again on test images the recovery never saw, from the written file.
    after = self._agreement(out)
    self.assertLess(self.unrecovered, 0.5)
    self.assertGreater(after, 0.8)
    self.assertGreater(after, self.unrecovered + 0.4)
    self.assertEqual(doc["params_after"], 72506)  # recovery changes values, not shapes
    self.assertTrue(doc["verify"]["passed"])
    self.assertNotIn("accuracy", rec["history"][0])  # no labels in distillation
    losses = [h["loss"] for h in rec["history"]]
    self.assertLess(losses[-1], losses[0])

  def test_finetune_on_labels(self):
    out, doc = self._prune("finetuned.pb", dataclasses.replace(
        _FAST, method=recover_options.FINETUNE, train_steps=200, distill_weight=0.5))
    self.assertEqual(doc["recovery"]["distill_weight"], 0.5)
    history = doc["recovery"]["history"]
    self.assertGreater(history[-1]["accuracy"], history[0]["accuracy"])
    self.assertGreater(history[-1]["accuracy"], 0.7)
    self.assertGreater(self._agreement(out), self.unrecovered + 0.4)

  def test_distillation_on_augmented_batches(self):
    aug = augment.parse(["flip", "shift=2", "mixup=0.4"])
    out, doc = self._prune("augmented.pb", dataclasses.replace(_FAST, train_steps=200,
                                                               augment=aug))
    rec = doc["recovery"]
    self.assertEqual(rec["augment"], {"flip": True, "shift": 2, "mixup": 0.4})
    self.assertGreater(rec["holdout_agreement_after"], rec["holdout_agreement_before"] + 0.4)
    self.assertGreater(self._agreement(out), self.unrecovered + 0.4)
    self.assertTrue(doc["verify"]["passed"])

  def test_distillation_with_batch_statistics(self):
    out, doc = self._prune("batch_stats.pb", dataclasses.replace(_FAST, train_steps=200,
                                                                 batch_stats=True))
    rec = doc["recovery"]
    self.assertEqual(rec["batch_stats"]["layers"], 6)  # five conv+BN and fc1+BN, not logits
    self.assertEqual(rec["batch_stats"]["calibration_samples"], _FAST.calibration_samples)
    self.assertGreater(rec["holdout_agreement_after"], rec["holdout_agreement_before"] + 0.4)
    self.assertGreater(self._agreement(out), self.unrecovered + 0.4)
    self.assertTrue(doc["verify"]["passed"])
    # Folded back: the written graph has the pruned graph's ops and nothing else.
    plain, _ = self._prune("batch_stats_plain.pb", dataclasses.replace(_FAST, train_steps=1))
    ops = lambda path: [n.op for n in tf_model.load(path).graph_def.node]
    self.assertEqual(ops(out), ops(plain))

  def test_finetune_with_dropout(self):
    out, doc = self._prune("dropout.pb", dataclasses.replace(
        _FAST, method=recover_options.FINETUNE, train_steps=200, distill_weight=0.5,
        dropout=0.3, batch_stats=True))
    rec = doc["recovery"]
    self.assertEqual(rec["dropout"], {"rate": 0.3, "layer": "fmnist_vgg_bn_1/logits_1/MatMul"})
    self.assertGreater(rec["holdout_agreement_after"], rec["holdout_agreement_before"] + 0.4)
    self.assertGreater(self._agreement(out), self.unrecovered + 0.4)
    self.assertTrue(doc["verify"]["passed"])
    # Only the training graph had the dropout: the written one has the pruned graph's ops.
    plain, _ = self._prune("dropout_plain.pb", dataclasses.replace(_FAST, train_steps=1))
    graph = lambda path: [(n.name, n.op, list(n.input)) for n in tf_model.load(path).graph_def.node]
    self.assertEqual(graph(out), graph(plain))

  def test_finetune_mixes_the_labels_of_mixed_samples(self):
    out, doc = self._prune("finetuned_mixup.pb", dataclasses.replace(
        _FAST, method=recover_options.FINETUNE, train_steps=200,
        augment=augment.parse(["mixup=0.4"])))
    history = doc["recovery"]["history"]
    self.assertLess(history[-1]["loss"], history[0]["loss"])
    self.assertGreater(self._agreement(out), self.unrecovered + 0.4)

  def test_increments_train_with_seeds_of_their_own(self):
    # Regression: every increment of --steps trained with the same seed, so on the same
    # first batches of the data (its order is a function of the seed and the step).
    with mock.patch.object(recover, "recover", wraps=recover.recover) as recovered:
      _, doc = self._prune("increments.pb", dataclasses.replace(_FAST, train_steps=5, seed=7),
                           steps=3)
    self.assertLen(doc["increments"], 3)
    self.assertEqual([c.args[3].seed for c in recovered.call_args_list], [7, 8, 9])

  def test_probe_is_a_short_recovery(self):
    """--mode=mixed's probe: a fifth of the steps by default, none where the method
    takes no steps; the agreement it returns is the short recovery's held-out one."""
    probe = lambda **kw: recover.Recovery(dataclasses.replace(_FAST, **kw)).probe_steps
    self.assertEqual([probe(train_steps=1000), probe(train_steps=3), probe(probe_steps=0),
                      probe(train_steps=1000, probe_steps=40),
                      probe(method=recover_options.BN_RECALIBRATE),
                      probe(method=recover_options.GAP)], [200, 1, 0, 40, 0, 0])
    with self.assertRaisesRegex(errors.UsageError, "--recover_probe_steps is -2"):
      recover_options.check(dataclasses.replace(_FAST, probe_steps=-2))
    out = os.path.join(self.tmp, "to_probe.pb")
    pipeline.prune(_PB, out, pipeline.Options(ratio=0.5, overwrite=True))
    with mock.patch.object(recover, "recover", wraps=recover.recover) as recovered:
      agreed, doc = recover.Recovery(dataclasses.replace(
          _FAST, train_steps=500, probe_steps=60, checkpoint_dir=self.tmp)).probe(
              self.original, tf_model.load(out))
    options = recovered.call_args.args[3]
    self.assertEqual((options.train_steps, options.checkpoint_dir), (60, None))
    self.assertEqual(doc["train_steps"], 60)
    self.assertEqual(agreed, doc["holdout_agreement_after"])
    self.assertGreater(agreed, doc["holdout_agreement_before"] + 0.2)

  def test_bn_recalibration_raises_agreement_without_training(self):
    out, doc = self._prune("recalibrated.pb", dataclasses.replace(
        _FAST, method=recover_options.BN_RECALIBRATE))
    rec = doc["recovery"]
    self.assertEqual(rec["sites_adjusted"], rec["sites"])
    self.assertEqual(rec["sites"], 7)  # five conv+BN, fc1+BN, logits
    self.assertGreater(self._agreement(out), self.unrecovered + 0.15)

  def test_recalibrated_layers_match_the_original_statistics(self):
    prepared = pipeline.prepare(_PB)
    plan = pipeline.make_plan(prepared, pipeline.Options(ratio=0.5))
    pruned = pipeline.rewrite(prepared, plan)
    kept = pipeline.kept_positions(prepared.analysis, plan)
    data = recover_data.load_data(pruned, _FAST, labels=False)
    out, _ = calibrate.recalibrate(prepared.model, pruned, kept, data, _FAST)
    sites, _ = calibrate.find_sites(tf_model.to_view(out), tf_ops.REGISTRY)
    x = calibrate.calibration_inputs(data, _FAST.calibration_samples)
    tensors = [site.tensor for site in sites]
    self.assertLen(tensors, 7)

    def stats(model):
      fn, _ = tf_model.concrete_function(model.graph_def, list(model.inputs), tensors)
      outs = [o.numpy().astype(np.float64) for o in fn(tf.constant(x))]
      return [(o.mean(tuple(range(o.ndim - 1))), o.std(tuple(range(o.ndim - 1)))) for o in outs]
    want = [(m[kept[t]], s[kept[t]]) if t in kept else (m, s)
            for t, (m, s) in zip(tensors, stats(prepared.model))]
    before, got = stats(pruned), stats(out)
    # Every layer after the first sees fewer inputs: its statistics were off ...
    self.assertGreater(max(np.abs(b[1] - w[1]).max() for b, w in zip(before[1:], want[1:])), 0.05)
    # ... and each is fitted to the original's, in graph order.
    for (gm, gs), (wm, ws) in zip(got, want):
      np.testing.assert_allclose(gm, wm, atol=1e-4)
      np.testing.assert_allclose(gs, ws, rtol=1e-4)

  def test_two_increments_reach_the_single_shot_counts(self):
    out, doc = self._prune("steps.pb", dataclasses.replace(_FAST, method=recover_options.BN_RECALIBRATE),
                           steps=2)
    self.assertEqual(doc["steps"], 2)
    self.assertLen(doc["increments"], 2)
    for inc in doc["increments"]:
      self.assertTrue(inc["verify"]["passed"])
      self.assertIn("recovery", inc)
    single = pipeline.prune(_PB, os.path.join(self.tmp, "single.pb"),
                            pipeline.Options(ratio=0.5, overwrite=True))
    self.assertEqual([g["channels_after"] for g in doc["groups"]],
                     [g["channels_after"] for g in single["groups"]])
    self.assertEqual(doc["params_after"], single["params_after"])

  def test_saved_model_in_saved_model_out(self):
    out, doc = self._prune("recovered_sm", dataclasses.replace(_FAST, train_steps=50),
                           source=_SM)
    self.assertTrue(os.path.isdir(out))
    loaded = tf.saved_model.load(out)
    serve = loaded.signatures["serving_default"]
    self.assertEqual(list(serve.structured_outputs), ["logits"])
    logits = serve(images=tf.constant(self.x[:8]))["logits"].numpy()
    self.assertEqual(logits.shape, (8, 10))
    self.assertGreater(doc["recovery"]["holdout_agreement_after"],
                       doc["recovery"]["holdout_agreement_before"])

  def test_mirrored_strategy_with_two_replicas(self):
    script = (
        "import tensorflow as tf\n"
        "cpu = tf.config.list_physical_devices('CPU')[0]\n"
        "tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()]"
        " * 2)\n"
        "import json, sys\n"
        "from graph_prune import pipeline\n"
        "from graph_prune.data import preprocess\n"
        "from graph_prune.recover import recover\n"
        "o = recover.Options(data='fashion-mnist:train', preprocess=preprocess.Preprocess("
        "scale=1/255), holdout_samples=500, train_steps=60, strategy='mirrored')\n"
        "doc = pipeline.prune(sys.argv[1], sys.argv[2], pipeline.Options(ratio=0.5, "
        "recover=recover.Recovery(o), overwrite=True))\n"
        "print('RESULT', json.dumps(doc['recovery']))\n")
    env = dict(os.environ, PYTHONPATH=_ROOT, TF_CPP_MIN_LOG_LEVEL="3")
    r = subprocess.run([sys.executable, "-c", script, _PB, os.path.join(self.tmp, "mirror.pb")],
                       capture_output=True, text=True, env=env, timeout=600, check=False)
    self.assertEqual(r.returncode, 0, r.stderr[-2000:])
    rec = json.loads(r.stdout.split("RESULT ", 1)[1])
    self.assertEqual(rec["replicas"], 2)
    self.assertGreater(rec["holdout_agreement_after"], rec["holdout_agreement_before"] + 0.3)


class BatchStatsTest(absltest.TestCase):
  """The normalisations inserted for training and their folding back, against the
  training graph itself: on the calibration set taken as one batch, batch statistics
  are the statistics the folding uses, so the two must agree."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.model = tf_model.normalise(tf_model.load(_PB))
    cls.logits = tf_trainable.logits_tensor(cls.model)
    cls.x = _test_images(96)
    cls.training = batch_stats.insert(cls.model, cls.logits, cls.x)
    cls.names = tf_trainable.weight_constants(cls.model) + cls.training.constants

  def _outputs(self, model, names=()):
    return tf_trainable.Trainable(model, fetches=[self.logits], trainable=names)(self.x)[0]

  def test_normalises_every_folded_batch_norm_but_the_logits(self):
    sites = [p.site for p in self.training.points]
    self.assertLen(sites, 6)
    self.assertTrue(all(s.shift for s in sites))
    self.assertNotIn(self.logits, [s.tensor for s in sites])
    self.assertLen([s for s in sites if s.scale], 1)  # fc1: MatMul, Mul, AddV2
    # Every reader of a site's output but the normalisation's own reads the normalised one.
    nodes = self.training.model.graph_def.node
    self.assertLen([n for n in nodes if n.op == "Rsqrt"], 6)
    for site in sites:
      ref = site.tensor[:-2]
      readers = [n.name for n in nodes if ref in n.input]
      self.assertTrue(readers)
      self.assertTrue(all(r.startswith("graph_prune_batch_stats/") for r in readers), readers)

  def test_starts_where_the_model_is(self):
    np.testing.assert_allclose(self._outputs(self.training.model, self.names),
                               self._outputs(self.model), rtol=0, atol=1e-4)

  def test_folded_model_computes_what_the_trained_graph_computes(self):
    net = tf_trainable.Trainable(self.training.model, fetches=[self.logits],
                                 trainable=self.names)
    rng = np.random.default_rng(1)
    net.assign({n: (v * (1 + 0.2 * rng.standard_normal(v.shape))
                    + 0.1 * rng.standard_normal(v.shape)).astype(v.dtype)
                for n, v in net.values().items()})  # as if trained
    trained = net(self.x)[0].numpy()
    folded = batch_stats.fold(self.model, self.training, net.values(), self.x)
    out = self._outputs(folded).numpy()
    self.assertGreater(np.abs(trained - self._outputs(self.model).numpy()).max(), 1.0)
    np.testing.assert_allclose(out, trained, rtol=0, atol=1e-4 * np.abs(trained).max())
    self.assertEqual([n.op for n in folded.graph_def.node],
                     [n.op for n in self.model.graph_def.node])

  def test_one_channel_layer(self):
    # Regression: a one-channel layer's shift has one element, so it is not among the
    # weight constants training took its variables from, and folding back read a
    # value that training never had (KeyError).
    import keras  # pylint: disable=g-import-not-at-top
    inputs = keras.Input((8, 8, 2))
    h = keras.layers.ReLU()(keras.layers.Conv2D(1, 3, padding="same", name="one")(inputs))
    model = keras.Model(inputs, keras.layers.Dense(3, name="fc")(keras.layers.Flatten()(h)))
    rng = np.random.default_rng(2)
    for layer in (model.get_layer("one"), model.get_layer("fc")):
      layer.set_weights([rng.standard_normal(w.shape).astype(np.float32) * 0.5 + 0.1
                         for w in layer.get_weights()])
    graph_def, _, _ = tf_model.freeze(model, [8, 8, 2], "x", "y")
    path = os.path.join(self.create_tempdir().full_path, "one.pb")
    with open(path, "wb") as f:
      f.write(graph_def.SerializeToString())
    frozen = tf_model.normalise(tf_model.load(path))
    logits = tf_trainable.logits_tensor(frozen)
    x = rng.standard_normal((64, 8, 8, 2)).astype(np.float32)
    data = recover_data.Data(tf.data.Dataset.from_tensor_slices((x, np.zeros(64, np.int64))),
                             x[:8], 64, "planted")
    options = dataclasses.replace(_FAST, train_steps=5, batch_size=16, calibration_samples=64,
                                  batch_stats=True, learning_rate=0.05)
    trained, doc = train.train(recover.frozen_function(frozen, logits), frozen, logits, data,
                               options)
    self.assertEqual(doc["batch_stats"]["layers"], 1)
    site = batch_stats.sites(frozen, logits)[0][0]
    self.assertNotIn(site.shift, tf_trainable.weight_constants(frozen))  # one element
    shift = lambda m: tf_trainable.constant_values(m, [site.shift])[site.shift]
    self.assertFalse(np.array_equal(shift(frozen), shift(trained)))  # trained, folded back


class DropoutTest(absltest.TestCase):
  """Dropout at the classifier's input, against the classifier computed by hand."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.model = tf_model.normalise(tf_model.load(_PB))
    cls.logits = tf_trainable.logits_tensor(cls.model)
    cls.training, cls.layer = dropout.insert(cls.model, cls.logits, 0.3)
    cls.x = _test_images(64)

  def _logits(self, seed):
    net = tf_trainable.Trainable(self.training, fetches=[self.logits], trainable=())
    return net(self.x, tf.constant(seed, tf.int64))[0].numpy()

  def test_finds_the_dense_layer_behind_the_logits(self):
    self.assertEqual(self.layer, "fmnist_vgg_bn_1/logits_1/MatMul")
    self.assertEqual(self.training.inputs, self.model.inputs + (dropout.SEED,))

  def test_drops_and_rescales_the_classifier_input(self):
    node = next(n for n in self.model.graph_def.node if n.name == self.layer)
    h, plain = tf_trainable.Trainable(
        self.model, fetches=[tf_model.tensor_name(node.input[0]), self.logits],
        trainable=())(self.x)
    h, plain = h.numpy(), plain.numpy()
    w = tf_model.tensor_name(node.input[1])
    w = tf_trainable.constant_values(self.model, [w])[w]
    seed = [5, 11]
    keep = tf.raw_ops.StatelessRandomUniform(shape=h.shape, seed=seed,
                                             dtype=tf.float32).numpy() >= 0.3
    self.assertAlmostEqual(keep.mean(), 0.7, delta=0.05)
    expected = plain + (h * keep / 0.7 - h) @ w   # the logits are h @ w + bias
    np.testing.assert_allclose(self._logits(seed), expected, rtol=0,
                               atol=1e-4 * np.abs(expected).max())
    self.assertGreater(np.abs(self._logits(seed) - plain).max(), 0.1)

  def test_masks_are_a_function_of_the_seed(self):
    np.testing.assert_array_equal(self._logits([5, 11]), self._logits([5, 11]))
    self.assertGreater(np.abs(self._logits([5, 11]) - self._logits([5, 12])).max(), 0.1)

  def test_logits_without_a_classifier(self):
    import keras  # pylint: disable=g-import-not-at-top
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.ReLU()(keras.layers.Dense(3)(inputs)))
    graph_def, _, _ = tf_model.freeze(model, [4], "x", "y")
    path = os.path.join(self.create_tempdir().full_path, "relu.pb")
    with open(path, "wb") as f:
      f.write(graph_def.SerializeToString())
    frozen = tf_model.normalise(tf_model.load(path))
    with self.assertRaisesRegex(errors.UsageError, "do not come from a dense or convolution"):
      dropout.insert(frozen, tf_trainable.logits_tensor(frozen), 0.3)

  def test_model_with_the_dropout_nodes_already(self):
    # Inserted twice, the second seed and masks would clash with the first; refused.
    with self.assertRaisesRegex(errors.InputError, "already has nodes named graph_prune_dropout"):
      dropout.insert(self.training, self.logits, 0.3)
    self.assertEqual(len(self.training.graph_def.node), len(self.model.graph_def.node) + 9)


class AugmentTest(absltest.TestCase):
  """The batch transforms, checked sample by sample against numpy."""

  def setUp(self):
    super().setUp()
    self.x = np.random.default_rng(0).normal(size=(16, 7, 9, 2)).astype(np.float32)

  def _apply(self, entries, step=0):
    y, lam, partner = augment.apply(augment.parse(entries), tf.constant(self.x),
                                    tf.constant([3, step], tf.int64))
    return (y.numpy(), None if lam is None else lam.numpy(),
            None if partner is None else partner.numpy())

  def test_flip_mirrors_about_half_of_the_images(self):
    y, _, _ = self._apply(["flip"])
    mirrored = [bool(np.array_equal(b, a[:, ::-1])) for a, b in zip(self.x, y)]
    for a, b, m in zip(self.x, y, mirrored):
      self.assertTrue(m or np.array_equal(a, b))
    self.assertBetween(sum(mirrored), 2, 14)

  def test_shift_moves_each_image_within_n_pixels_with_mirrored_edges(self):
    n = 2
    y, _, _ = self._apply([f"shift={n}"])
    padded = np.pad(self.x, [(0, 0), (n, n), (n, n), (0, 0)], mode="symmetric")
    moves = set()
    for i, b in enumerate(y):
      found = [(dy, dx) for dy in range(2 * n + 1) for dx in range(2 * n + 1)
               if np.array_equal(padded[i, dy:dy + 7, dx:dx + 9], b)]
      self.assertNotEmpty(found, f"sample {i} is no shift of its image")
      moves.add(found[0])
    self.assertGreater(len(moves), 4)  # per sample, not one move for the batch

  def test_mixup_is_a_convex_pair_per_sample(self):
    y, lam, partner = self._apply(["mixup=0.4"])
    self.assertTrue(np.all((lam >= 0) & (lam <= 1)))
    self.assertGreater(np.ptp(lam), 0.1)
    np.testing.assert_array_equal(np.sort(partner), np.arange(16))
    want = lam[:, None, None, None] * self.x + (1 - lam[:, None, None, None]) * self.x[partner]
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)

  def test_finetune_mixes_the_two_labels_by_lam(self):
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(6, 10)).astype(np.float32)
    labels = np.array([0, 3, 3, 9, 1, 2])
    lam = np.array([0.1, 0.5, 0.9, 1.0, 0.0, 0.3], np.float32)
    partner = np.array([5, 0, 1, 2, 3, 4])
    got = train._per_sample_loss(  # pylint: disable=protected-access
        tf.constant(logits), tf.constant(logits), tf.constant(labels),
        dataclasses.replace(_FAST, method=recover_options.FINETUNE),
        tf.constant(lam), tf.constant(partner)).numpy()
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    rows = np.arange(6)
    want = -(lam * log_p[rows, labels] + (1 - lam) * log_p[rows, labels[partner]])
    np.testing.assert_allclose(got, want, rtol=1e-5)

  def test_mixup_never_pairs_a_sample_with_itself(self):
    for n in (2, 3, 7):
      _, _, partner = augment.apply(augment.parse(["mixup"]), tf.zeros([n, 4, 4, 1]),
                                    tf.constant([0, 0], tf.int64))
      self.assertTrue(np.all(partner.numpy() != np.arange(n)), n)

  def test_a_function_of_seed_and_step(self):
    spec = ["flip", "shift=3", "mixup"]
    np.testing.assert_array_equal(self._apply(spec, 5)[0], self._apply(spec, 5)[0])
    self.assertFalse(np.array_equal(self._apply(spec, 5)[0], self._apply(spec, 6)[0]))

  def test_nothing_asked_nothing_changed(self):
    y, lam, _ = self._apply([])
    np.testing.assert_array_equal(y, self.x)
    self.assertIsNone(lam)

  def test_bad_entries(self):
    for entries, match in ((["blur"], "unknown 'blur'"), (["shift=0"], "shift=0"),
                           (["shift=a"], "shift=a"), (["mixup=-1"], "mixup=-1"),
                           (["flip=2"], "takes no value"), (["flip", "flip"], "twice")):
      with self.assertRaisesRegex(errors.UsageError, match):
        augment.parse(entries)


class ResumeTest(absltest.TestCase):

  def test_interrupted_recovery_resumes_from_its_checkpoint(self):
    tmp = self.create_tempdir().full_path
    common = [f"--in={_PB}", "--ratio=0.5", "--recover=distill", f"--recover_data={_DATA}",
              "--scale=1/255", "--recover_train_steps=120", "--checkpoint_every=40",
              "--log_every=20", "--holdout_samples=500",
              # The augmentation and the dropout masks are functions of the step: resumed,
              # the run draws what the uninterrupted run drew.
              "--recover_augment=flip,shift=2,mixup=0.4", "--recover_dropout=0.3"]
    ckpt = os.path.join(tmp, "ckpt")
    env = dict(os.environ, PYTHONPATH=_ROOT, TF_CPP_MIN_LOG_LEVEL="3", TF_DETERMINISTIC_OPS="1")
    proc = subprocess.Popen([*binaries.command("prune"), *common,
                             f"--out={tmp}/resumed.pb", f"--checkpoint_dir={ckpt}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 300
    # The manager writes the checkpoint's files first and then the state file that names it;
    # a kill between the two leaves nothing to resume from (regression: CI killed the run
    # after ckpt-40.index but before the state file, and the re-run started from step 0).
    while tf.train.latest_checkpoint(ckpt) is None and time.time() < deadline:
      self.assertIsNone(proc.poll(), "recovery ended before its first checkpoint")
      time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    self.assertFalse(os.path.exists(f"{tmp}/resumed.pb"))
    r = _cli(*common, f"--out={tmp}/resumed.pb", f"--checkpoint_dir={ckpt}",
             f"--report={tmp}/resumed.json")
    self.assertEqual(r.returncode, 0, r.stderr[-2000:])
    self.assertRegex(r.stderr, r"resuming from step (40|80)")
    resumed = json.load(open(f"{tmp}/resumed.json"))["recovery"]
    self.assertIn(resumed["resumed_from_step"], (40, 80))
    self.assertEqual(resumed["history"][-1]["step"], 120)
    # Same batches, same optimizer state: the result equals an uninterrupted run.
    r = _cli(*common, f"--out={tmp}/straight.pb", f"--report={tmp}/straight.json")
    self.assertEqual(r.returncode, 0, r.stderr[-2000:])
    x = _test_images(200)
    a = tf_model.Runner(tf_model.load(f"{tmp}/resumed.pb"))([x])[0]
    b = tf_model.Runner(tf_model.load(f"{tmp}/straight.pb"))([x])[0]
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    # A finished recovery re-run resumes at its end and does no more steps.
    r = _cli(*common, f"--out={tmp}/again.pb", f"--checkpoint_dir={ckpt}",
             f"--report={tmp}/again.json")
    self.assertEqual(r.returncode, 0, r.stderr[-2000:])
    self.assertEqual(json.load(open(f"{tmp}/again.json"))["recovery"]["resumed_from_step"], 120)


class BadInputTest(absltest.TestCase):
  """One line, exit 2, nothing written."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = absltest.get_default_test_tmpdir()
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (200, 28, 28, 1)).astype(np.float32)
    cls.labels_out_of_range = os.path.join(cls.tmp, "labels.npz")
    np.savez(cls.labels_out_of_range, x=x, y=rng.integers(5, 15, 200))
    cls.wrong_shape = os.path.join(cls.tmp, "shape.npz")
    np.savez(cls.wrong_shape, x=x[:, :20, :20], y=np.zeros(200, np.int64))
    cls.empty = os.path.join(cls.tmp, "empty.npz")
    np.savez(cls.empty, x=x[:0], y=np.zeros(0, np.int64))
    cls.unlabelled = os.path.join(cls.tmp, "unlabelled.npz")
    np.savez(cls.unlabelled, x=x)
    # Class folders of PNG images: their source leaves the sample shape open.
    cls.folders = os.path.join(cls.tmp, "folders")
    for label in ("a", "b"):
      os.makedirs(os.path.join(cls.folders, label))
      for i in range(3):
        png = tf.io.encode_png(x[i].astype(np.uint8)).numpy()
        with open(os.path.join(cls.folders, label, f"{i}.png"), "wb") as f:
          f.write(png)

  def _fails(self, *args, match):
    out = os.path.join(self.tmp, f"out_{abs(hash(args))}.pb")
    r = _cli(f"--in={_PB}", f"--out={out}", "--scale=1/255", "--recover_train_steps=20", *args)
    self.assertEqual(r.returncode, 2, r.stderr[-2000:])
    lines = _error_lines(r.stderr)
    self.assertLen(lines, 1, r.stderr[-2000:])
    self.assertRegex(lines[0], match)
    self.assertNotIn("Traceback", r.stderr)
    self.assertFalse(os.path.exists(out))

  def test_labels_out_of_range(self):
    self._fails("--recover=finetune", f"--recover_data={self.labels_out_of_range}",
                match="label out of range")

  def test_images_of_the_wrong_shape(self):
    self._fails("--recover=distill", f"--recover_data={self.wrong_shape}",
                match=r"shape \[20, 20, 1\].*takes \[28, 28, 1\]")

  def test_empty_dataset(self):
    self._fails("--recover=distill", f"--recover_data={self.empty}", match="no samples")

  def test_missing_data_path(self):
    self._fails("--recover=distill", f"--recover_data={self.tmp}/nowhere.npz",
                match="does not exist")

  def test_finetune_needs_labels(self):
    self._fails("--recover=finetune", f"--recover_data={self.unlabelled}", match="no array 'y'")

  def test_no_data(self):
    self._fails("--recover=distill", match="needs --recover_data")

  def test_onnx_input(self):
    onnx_path = os.path.join(self.tmp, "m.onnx")
    with open(onnx_path, "wb") as f:
      f.write(b"not read: the flag check comes first")
    out = os.path.join(self.tmp, "m_out.onnx")
    r = _cli(f"--in={onnx_path}", f"--out={out}", "--recover=distill", f"--recover_data={_DATA}")
    self.assertEqual(r.returncode, 2)
    self.assertRegex(_error_lines(r.stderr)[0], "--recover trains TensorFlow graphs")

  def test_augmentation_of_no_training(self):
    self._fails("--recover=bn_recalibrate", f"--recover_data={_DATA}", "--recover_augment=flip",
                match="not to bn_recalibrate")

  def test_unknown_augmentation(self):
    self._fails("--recover=distill", f"--recover_data={_DATA}", "--recover_augment=flip,blur",
                match="unknown 'blur'")

  def test_shift_as_large_as_the_images(self):
    self._fails("--recover=distill", f"--recover_data={_DATA}", "--recover_augment=shift=28",
                match=r"shift=28 is not smaller than the images \(28 x 28\)")

  def test_shift_as_large_as_images_whose_source_leaves_their_size_open(self):
    self._fails("--recover=distill", f"--recover_data={self.folders}",
                "--recover_augment=shift=30", match=r"shift=30 is not smaller than the images")

  def test_batch_statistics_of_no_training(self):
    self._fails("--recover=bn_recalibrate", f"--recover_data={_DATA}", "--recover_batch_stats",
                match="applies to --recover=distill and finetune")

  def test_batch_statistics_without_recovery(self):
    self._fails("--recover_batch_stats", match="give --recover")

  def test_dropout_without_recovery(self):
    self._fails("--recover_dropout=0.3", match="give --recover")

  def test_dropout_of_no_training(self):
    self._fails("--recover=bn_recalibrate", f"--recover_data={_DATA}", "--recover_dropout=0.3",
                match="not to bn_recalibrate")

  def test_dropout_rate_of_one(self):
    self._fails("--recover=distill", f"--recover_data={_DATA}", "--recover_dropout=1",
                match=r"--recover_dropout is 1.0; it must be in \[0, 1\)")

  def test_probe_steps_without_recovery(self):
    self._fails("--recover_probe_steps=50", match="give --recover")

  def test_probe_steps_without_mixed_mode(self):
    self._fails("--recover=distill", f"--recover_data={_DATA}", "--recover_probe_steps=50",
                match="--recover_probe_steps scores the candidates of --mode=mixed; "
                      "--mode=filter has none")

  def test_augmentation_without_recovery(self):
    self._fails("--recover_augment=flip", match="give --recover")

  def test_checkpoint_dir_of_another_recovery(self):
    ckpt = os.path.join(self.tmp, "other_ckpt")
    r = _cli(f"--in={_PB}", f"--out={self.tmp}/first.pb", "--scale=1/255",
             "--recover=distill", f"--recover_data={self.unlabelled}", "--recover_train_steps=5",
             f"--checkpoint_dir={ckpt}", "--holdout_samples=20", "--overwrite")
    self.assertEqual(r.returncode, 0, r.stderr[-2000:])
    self._fails("--recover=distill", f"--recover_data={self.unlabelled}", "--ratio=0.25",
                f"--checkpoint_dir={ckpt}", match="checkpoints of another model")


if __name__ == "__main__":
  absltest.main()
