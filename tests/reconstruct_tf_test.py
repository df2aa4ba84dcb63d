"""Reconstruction on TensorFlow graphs and through //tools:prune: exact bias folding of
planted constant channels in a frozen Keras model, the built-in model's accuracy
given back by lsq (also before an ONNX export), and bad calibration input (one
line, exit 2, nothing written), including a reconstruction that is refused."""

import json
import os
import subprocess

from absl.testing import absltest
import numpy as np

from graph_prune import pipeline
from graph_prune.adapters import tf_model
from graph_prune.calibration import samples as samples_lib
from graph_prune.data import idx
from graph_prune.reconstruct import reconstruct as reconstruct_lib
from tests import binaries

tf = tf_model.tf
DEFAULT = os.path.join(binaries.ROOT, "models", "default", "fmnist_vgg_bn.pb")


def _constant_channels_graph(seed=0):
  """conv 3x3 (8) + BN + ReLU -> conv 1x1 (8) + BN + ReLU -> global average pool ->
  Dense (5). Filters 1 and 6 of the first conv and 3 and 4 of the second have zero
  weights; their BN beta is positive, so after the ReLU their channels are
  non-zero constants. All biases and BN statistics are random."""
  import keras  # pylint: disable=g-import-not-at-top
  keras.utils.set_random_seed(seed)
  inputs = keras.Input((8, 8, 3))
  x = inputs
  for i, k in ((1, 3), (2, 1)):
    x = keras.layers.Conv2D(8, k, padding="same", name=f"conv{i}")(x)
    x = keras.layers.BatchNormalization(name=f"bn{i}")(x)
    x = keras.layers.ReLU()(x)
  x = keras.layers.GlobalAveragePooling2D()(x)
  outputs = keras.layers.Dense(5, name="fc")(x)
  model = keras.Model(inputs, outputs)
  rng = np.random.default_rng(seed)
  for i, dead in ((1, [1, 6]), (2, [3, 4])):
    conv, bn = model.get_layer(f"conv{i}"), model.get_layer(f"bn{i}")
    w, b = conv.get_weights()
    w = rng.standard_normal(w.shape).astype(np.float32)
    b = rng.standard_normal(b.shape).astype(np.float32) * 0.1
    w[..., dead] = 0.0
    b[dead] = 0.0
    conv.set_weights([w, b])
    gamma = rng.uniform(0.5, 1.5, 8).astype(np.float32)
    beta = rng.standard_normal(8).astype(np.float32) * 0.1
    mean = rng.standard_normal(8).astype(np.float32) * 0.1
    var = rng.uniform(0.5, 1.5, 8).astype(np.float32)
    beta[dead], mean[dead] = [0.8, 1.7], 0.0
    bn.set_weights([gamma, beta, mean, var])
  fc = model.get_layer("fc")
  fc.set_weights([rng.standard_normal((8, 5)).astype(np.float32),
                  rng.standard_normal(5).astype(np.float32)])
  graph_def, _, _ = tf_model.freeze(model, [8, 8, 3], "x", "y")
  return graph_def


class TfBiasTest(absltest.TestCase):

  def test_bias_makes_constant_channels_exact(self):
    tmp = self.create_tempdir().full_path
    src = os.path.join(tmp, "in.pb")
    with open(src, "wb") as f:
      f.write(_constant_channels_graph().SerializeToString())
    x = np.random.default_rng(1).standard_normal((250, 8, 8, 3)).astype(np.float32)
    np.savez(os.path.join(tmp, "c.npz"), x=x)
    doc = pipeline.prune(src, os.path.join(tmp, "out.pb"), pipeline.Options(
        ratio=0.25, calibration=samples_lib.Spec(os.path.join(tmp, "c.npz"), samples=200,
                                                 holdout=50),
        reconstruct=reconstruct_lib.Options("bias")))
    r = doc["reconstruction"]
    self.assertEqual(len(r["layers"]), 2, r)          # the 1x1 conv and the dense layer
    self.assertTrue(doc["verify"]["passed"])
    self.assertGreater(r["holdout_before"]["max_rel_diff"], 1e-2)
    self.assertLess(r["holdout_after"]["max_rel_diff"], 1e-5)
    self.assertEqual([g["channels_after"] for g in doc["groups"]], [6, 6])


def _taylor_graph(seed=0):
  """conv1 (8) + ReLU -> conv2 (6) + ReLU -> global average pool -> Dense (4). conv1's
  filters 0 and 1 are large, but conv2 reads nothing from their channels (zero
  weights there): removing them changes nothing, so taylor must remove them first,
  while l1 and activation keep them."""
  import keras  # pylint: disable=g-import-not-at-top
  keras.utils.set_random_seed(seed)
  inputs = keras.Input((8, 8, 3))
  x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv1")(inputs)
  x = keras.layers.Conv2D(6, 3, padding="same", activation="relu", name="conv2")(x)
  outputs = keras.layers.Dense(4, name="fc")(keras.layers.GlobalAveragePooling2D()(x))
  model = keras.Model(inputs, outputs)
  rng = np.random.default_rng(seed)
  w1 = rng.standard_normal((3, 3, 3, 8)).astype(np.float32) * 0.3
  w1[..., :2] *= 10
  w2 = rng.standard_normal((3, 3, 8, 6)).astype(np.float32) * 0.3
  w2[:, :, :2, :] = 0.0
  model.get_layer("conv1").set_weights([w1, rng.uniform(0.1, 0.3, 8).astype(np.float32)])
  model.get_layer("conv2").set_weights([w2, rng.uniform(0.1, 0.3, 6).astype(np.float32)])
  model.get_layer("fc").set_weights([rng.standard_normal((6, 4)).astype(np.float32),
                                     rng.standard_normal(4).astype(np.float32)])
  graph_def, _, _ = tf_model.freeze(model, [8, 8, 3], "x", "y")
  return graph_def


class TaylorTest(absltest.TestCase):

  def test_taylor_removes_the_filters_nothing_reads(self):
    from graph_prune.recover import taylor  # pylint: disable=g-import-not-at-top
    tmp = self.create_tempdir().full_path
    src = os.path.join(tmp, "in.pb")
    with open(src, "wb") as f:
      f.write(_taylor_graph().SerializeToString())
    np.savez(os.path.join(tmp, "c.npz"),
             x=np.random.default_rng(2).standard_normal((80, 8, 8, 3)).astype(np.float32))
    calibration = samples_lib.Spec(os.path.join(tmp, "c.npz"), samples=64, holdout=16)
    removed = {}
    for criterion in ("taylor", "l1"):
      plan_path = os.path.join(tmp, f"{criterion}.json")
      pipeline.prune(src, os.path.join(tmp, f"{criterion}.pb"), pipeline.Options(
          ratio=0.25, criterion=criterion, calibration=calibration, taylor=taylor.filter_scores,
          plan_out=plan_path, exclude=("*conv2*",)))
      with open(plan_path, encoding="utf-8") as f:
        plan = json.load(f)
      (group,) = [g for g in plan["groups"] if "conv1" in g["sources"][0]]
      self.assertEqual(group["criterion"], criterion)
      removed[criterion] = sorted(set(range(8)) - set(group["keep"]))
    self.assertEqual(removed["taylor"], [0, 1])
    self.assertFalse(set(removed["l1"]) & {0, 1})


def _run(args):
  return subprocess.run(binaries.command("prune") + args, capture_output=True, text=True,
                        env=binaries.env(), check=False)


class CliTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.tmp = self.create_tempdir().full_path

  def test_lsq_gives_accuracy_back_before_onnx_export(self):
    out, report = os.path.join(self.tmp, "p.onnx"), os.path.join(self.tmp, "r.json")
    res = _run([f"--in={DEFAULT}", f"--out={out}", "--ratio=0.5", "--reconstruct=lsq",
                "--criterion=activation", "--calibration_data=fashion-mnist:train",
                "--calibration_samples=1200", "--calibration_holdout=300", "--scale=1/255",
                "--out_format=onnx", f"--report={report}"])
    self.assertEqual(res.returncode, 0, res.stderr[-2000:])
    with open(report, encoding="utf-8") as f:
      r = json.load(f)["reconstruction"]
    self.assertLess(r["holdout_before"]["agreement"], 0.5)    # the slice alone: near chance
    self.assertGreater(r["holdout_after"]["agreement"], 0.85)
    self.assertEqual(r["layers_refitted"], 6)
    self.assertIn("reconstruction: lsq, 6 layers re-fitted", res.stdout)
    self.assertTrue(os.path.exists(out))

  def test_saved_model_bias(self):
    out, report = os.path.join(self.tmp, "sm"), os.path.join(self.tmp, "r.json")
    res = _run([f"--in={DEFAULT[:-3]}_savedmodel", f"--out={out}", "--ratio=0.25",
                "--reconstruct=bias", "--calibration_data=fashion-mnist:train",
                "--calibration_samples=300", "--calibration_holdout=100", "--scale=1/255",
                f"--report={report}"])
    self.assertEqual(res.returncode, 0, res.stderr[-2000:])
    with open(report, encoding="utf-8") as f:
      r = json.load(f)["reconstruction"]
    self.assertEqual((r["method"], r["samples"], r["holdout_samples"]), ("bias", 300, 100))
    self.assertEqual(r["layers_refitted"], 6)
    self.assertTrue(os.path.isfile(os.path.join(out, "saved_model.pb")))

  def _refused(self, args, pattern):
    out = os.path.join(self.tmp, "p.pb")
    res = _run([f"--in={DEFAULT}", f"--out={out}", "--scale=1/255"] + args)
    self.assertEqual(res.returncode, 2, res.stderr[-2000:])
    lines = [l for l in res.stderr.splitlines() if l.startswith("prune: ")]   # not TF's chatter
    self.assertLen(lines, 1, res.stderr)
    self.assertNotIn("Traceback", res.stderr)
    self.assertRegex(lines[0], pattern)
    self.assertFalse(os.path.exists(out))
    self.assertEqual(sorted(os.listdir(self.tmp)), sorted(
        f for f in os.listdir(self.tmp) if f.endswith(".npz")))

  def _npz(self, x):
    path = os.path.join(self.tmp, "c.npz")
    np.savez(path, x=x)
    return path

  def test_no_calibration_data(self):
    self._refused(["--reconstruct=lsq"], r"^prune: error: --reconstruct=lsq needs calibration samples: give --calibration_data")

  def test_wrong_shape(self):
    self._refused(["--reconstruct=lsq", f"--calibration_data={self._npz(np.zeros((9, 32, 32)))}"],
                  r"gives samples of shape \[32, 32, 1\], but the model takes \[28, 28, 1\]")

  def test_empty(self):
    self._refused(["--reconstruct=bias",
                   f"--calibration_data={self._npz(np.zeros((0, 28, 28)))}"], r"no samples")

  def test_non_finite(self):
    x = np.ones((20, 28, 28), np.float32)
    x[7, 3, 3] = np.inf
    self._refused(["--criterion=apoz", f"--calibration_data={self._npz(x)}"],
                  r"NaN or infinite values \(sample 7")

  def test_too_few_samples(self):
    x = np.random.default_rng(0).uniform(0, 255, (300, 28, 28)).astype(np.float32)
    self._refused(["--reconstruct=lsq", f"--calibration_data={self._npz(x)}"],
                  r"keeps 576 inputs per output; its least-squares fit needs at least 577 rows, "
                  r"and 240 calibration samples give 240: give at least 577 samples")

  def test_reconstruction_that_makes_agreement_worse_is_refused(self):
    # Fitted on blank images, checked on real ones: the fit is useless there.
    x, _ = idx.read_pair(*idx.split_files(idx.FASHION_MNIST_DIR, "test"))
    blank = np.full((1200, 28, 28), 128, np.uint8)
    path = self._npz(np.concatenate([blank, x[:300]]))
    self._refused(["--ratio=0.1", "--reconstruct=lsq", f"--calibration_data={path}",
                   "--calibration_samples=1200", "--calibration_holdout=300"],
                  r"--reconstruct=lsq made the pruned model worse on 300 held-out samples "
                  r"\(top-1 agreement with the original .* -> .*\); nothing written")


if __name__ == "__main__":
  absltest.main()
