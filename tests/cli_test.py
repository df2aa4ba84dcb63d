"""Bad input through the real command line: one line on stderr, exit 2, no output
file, input untouched."""

import hashlib
import os
import signal
import subprocess
import sys

from absl.testing import absltest
from absl.testing import parameterized

import graph_prune
from tests import binaries
from tests import keras_zoo

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(graph_prune.__file__)))
_PRUNE = os.path.join(_ROOT, "tools", "prune.py")


def _prune(*args):
  env = dict(os.environ, PYTHONPATH=_ROOT, TF_CPP_MIN_LOG_LEVEL="3")
  return subprocess.run([*binaries.command("prune"), *args], capture_output=True, text=True,
                        env=env, timeout=300, check=False)


def _digest(path):
  if os.path.isdir(path):
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(path)):
      for name in sorted(files):
        h.update(open(os.path.join(root, name), "rb").read())
    return h.hexdigest()
  return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _error_lines(stderr):
  """stderr lines that are not TensorFlow's own start-up chatter."""
  return [l for l in stderr.splitlines() if l.startswith("prune: ")]


class CliTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    tmp = absltest.get_default_test_tmpdir()
    model, _ = keras_zoo.make_planted_model(seed=0)
    gd, _, _ = keras_zoo.freeze(model)
    cls.pb = os.path.join(tmp, "good.pb")
    with open(cls.pb, "wb") as f:
      f.write(gd.SerializeToString())
    cls.sm = keras_zoo.save_saved_model(model, os.path.join(tmp, "good_sm"))
    data = open(cls.pb, "rb").read()
    cls.truncated = os.path.join(tmp, "truncated.pb")
    with open(cls.truncated, "wb") as f:
      f.write(data[: len(data) // 3])
    cls.corrupt = os.path.join(tmp, "corrupt.pb")
    with open(cls.corrupt, "wb") as f:
      f.write(data[:100] + bytes(range(256)) * 8 + data[2200:])
    cls.text = os.path.join(tmp, "notes.pb")
    with open(cls.text, "w") as f:
      f.write("this is not a model\n")
    # A graph with no convolution: nothing to prune.
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    with tf.Graph().as_default() as g:
      x = tf.compat.v1.placeholder(tf.float32, [None, 4], name="x")
      tf.nn.relu(x * 2.0, name="y")
    cls.trivial = os.path.join(tmp, "trivial.pb")
    with open(cls.trivial, "wb") as f:
      f.write(g.as_graph_def().SerializeToString())

  def _expect_error(self, args, needle, inputs=()):
    out = os.path.join(self.create_tempdir().full_path, "out.pb")
    before = {p: _digest(p) for p in inputs}
    r = _prune(*args, f"--out={out}")
    self.assertEqual(r.returncode, 2, r.stderr[-2000:])
    lines = _error_lines(r.stderr)
    self.assertLen(lines, 1, r.stderr[-2000:])
    self.assertIn(needle, lines[0])
    self.assertNotIn("Traceback", r.stderr)
    self.assertFalse(os.path.exists(out))
    self.assertEqual(os.listdir(os.path.dirname(out)), [])
    for p, d in before.items():
      self.assertEqual(_digest(p), d, f"{p} changed")

  def test_missing_path(self):
    self._expect_error(["--in=/nonexistent/model.pb"], "does not exist")

  def test_not_a_model(self):
    self._expect_error([f"--in={self.text}"], "is not a TensorFlow GraphDef", [self.text])

  def test_truncated_protobuf(self):
    self._expect_error([f"--in={self.truncated}"], "is not a", [self.truncated])

  def test_corrupted_protobuf(self):
    self._expect_error([f"--in={self.corrupt}"], "is not a", [self.corrupt])

  @parameterized.parameters("1.0", "-0.1", "1.5")
  def test_ratio_outside_range(self, ratio):
    self._expect_error([f"--in={self.pb}", f"--ratio={ratio}"], "outside [0, 1)", [self.pb])

  def test_unknown_criterion(self):
    self._expect_error([f"--in={self.pb}", "--criterion=magic"], "unknown criterion 'magic'",
                       [self.pb])

  def test_nothing_prunable(self):
    self._expect_error([f"--in={self.trivial}"], "nothing prunable", [self.trivial])

  def test_missing_signature(self):
    self._expect_error([f"--in={self.sm}", "--signature=predict"], "no signature 'predict'",
                       [self.sm])

  def test_not_an_onnx_file(self):
    fake = os.path.join(self.create_tempdir().full_path, "fake.onnx")
    with open(fake, "w") as f:
      f.write("this is not a model\n")
    self._expect_error([f"--in={fake}"], "is not an ONNX model", [fake])

  def test_truncated_onnx(self):
    import tf2onnx  # pylint: disable=g-import-not-at-top
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    gd = tf.compat.v1.GraphDef()
    gd.ParseFromString(open(self.pb, "rb").read())
    proto, _ = tf2onnx.convert.from_graph_def(gd, input_names=["input:0"],
                                              output_names=["Identity:0"], opset=17)
    data = proto.SerializeToString()
    cut = os.path.join(self.create_tempdir().full_path, "cut.onnx")
    with open(cut, "wb") as f:
      f.write(data[: len(data) // 2])
    self._expect_error([f"--in={cut}"], "is not an ONNX model", [cut])

  def test_out_format_onnx_needs_onnx_name(self):
    self._expect_error([f"--in={self.pb}", "--out_format=onnx"], "--out=NAME.onnx", [self.pb])

  def test_existing_output_refused_without_overwrite(self):
    out = os.path.join(self.create_tempdir().full_path, "exists.pb")
    with open(out, "w") as f:
      f.write("keep me")
    r = _prune(f"--in={self.pb}", f"--out={out}")
    self.assertEqual(r.returncode, 2)
    self.assertIn("pass --overwrite", _error_lines(r.stderr)[0])
    self.assertEqual(open(out).read(), "keep me")

  def test_tf_in_onnx_out(self):
    tmp = self.create_tempdir().full_path
    r = _prune(f"--in={self.pb}", f"--out={tmp}/p.onnx", "--out_format=onnx")
    self.assertEqual(r.returncode, 0, r.stderr[-3000:])
    self.assertIn("export: onnx (opset 17, tf2onnx) matches the pruned model", r.stdout)
    self.assertEqual(os.listdir(tmp), ["p.onnx"])

  def test_good_run_writes_output_and_report(self):
    tmp = self.create_tempdir().full_path
    before = _digest(self.sm)
    r = _prune(f"--in={self.sm}", f"--out={tmp}/pruned_sm", f"--report={tmp}/r.json")
    self.assertEqual(r.returncode, 0, r.stderr[-3000:])
    self.assertIn("verification: PASSED", r.stdout)
    self.assertTrue(os.path.isfile(os.path.join(tmp, "pruned_sm", "saved_model.pb")))
    self.assertEqual(sorted(os.listdir(tmp)), ["pruned_sm", "r.json"])
    self.assertEqual(_digest(self.sm), before)



class InterruptTest(absltest.TestCase):
  """SIGTERM or SIGINT at any point leaves no output and no temporary file."""

  # Runs //tools:prune with one step made slow (the disk's fsync: inside the
  # write; the oracle's comparison: before anything is written), so that the
  # test knows where the signal lands.
  _PAUSED = (
      "import os, runpy, sys, time\n"
      "def pausing(fn):\n"
      "  def wrapped(*args, **kw):\n"
      "    print('PAUSED', file=sys.stderr, flush=True)\n"
      "    time.sleep(60)\n"
      "    return fn(*args, **kw)\n"
      "  return wrapped\n"
      "if os.environ['GP_PAUSE'] == 'write':\n"
      "  os.fsync = pausing(os.fsync)\n"
      "else:\n"
      "  from graph_prune.verify import oracle\n"
      "  oracle.compare = pausing(oracle.compare)\n"
      "sys.argv = ['prune'] + sys.argv[1:]\n"
      "runpy.run_path(os.environ['GP_PRUNE'], run_name='__main__')\n")

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    model, _ = keras_zoo.make_planted_model(seed=1)
    gd, _, _ = keras_zoo.freeze(model)
    cls.pb = os.path.join(absltest.get_default_test_tmpdir(), "interrupted.pb")
    with open(cls.pb, "wb") as f:
      f.write(gd.SerializeToString())

  def _interrupt(self, sig, pause):
    tmp = self.create_tempdir().full_path
    proc = subprocess.Popen(
        [sys.executable, "-c", self._PAUSED, f"--in={self.pb}", f"--out={tmp}/out.pb",
         f"--report={tmp}/r.json", f"--plan_out={tmp}/plan.json"],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
        env=binaries.env(GP_PRUNE=_PRUNE, GP_PAUSE=pause))
    for line in proc.stderr:
      if "PAUSED" in line:
        break
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    self.assertEqual(proc.returncode, 130, err[-1500:])
    self.assertIn("prune: interrupted", err)
    self.assertNotIn("Traceback", err)
    self.assertEqual(os.listdir(tmp), [])

  def test_sigterm_mid_write(self):
    self._interrupt(signal.SIGTERM, "write")

  def test_sigint_mid_write(self):
    self._interrupt(signal.SIGINT, "write")

  def test_sigterm_during_verification(self):
    self._interrupt(signal.SIGTERM, "verify")

if __name__ == "__main__":
  absltest.main()
