"""Evaluation numbers on models whose predictions are known exactly.

The model reads the first ten pixel values (in [H, W, C] order) as the ten class
scores: logits = flatten(images) @ W with W[i, i] = 1. Every sample gets the
values 250, 230, ..., 70 on those pixels in a random class order, so the rank of
its label is chosen by the test: with RANKS below exactly 4 of 12 labels are the
top class and 8 of 12 are in the top five, whatever the file format, the model
format (GraphDef, SavedModel, tf2onnx ONNX, hand-made NCHW ONNX) or the
monotonic preprocessing.
"""

import gzip
import json
import os
import struct
import subprocess
import sys
import tempfile

import numpy as np
import onnx
from absl.testing import absltest
from absl.testing import parameterized
from onnx import helper
from onnx import numpy_helper

import graph_prune
from graph_prune import errors
from graph_prune.data import preprocess
from graph_prune.evaluate import evaluate
from graph_prune.evaluate import metrics
from tests import binaries

import tensorflow as tf  # pylint: disable=g-bad-import-order

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(graph_prune.__file__)))
_EVALUATE = os.path.join(_ROOT, "tools", "evaluate.py")

H, W, K = 4, 5, 10
RANKS = [0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 8, 9]
TOP1, TOP5 = 4 / 12, 8 / 12
SCALE = preprocess.Preprocess(scale=1 / 255)


def make_images(channels, seed, ranks=RANKS):
  """uint8 images [N, H, W, C] and labels whose rank under the model is `ranks`."""
  rng = np.random.default_rng(seed)
  x = rng.integers(0, 60, (len(ranks), H, W, channels), dtype=np.uint8)
  flat = x.reshape(len(ranks), -1)  # a view: writing it writes x
  labels = []
  for i, rank in enumerate(ranks):
    order = rng.permutation(K)  # order[j] is the class with the j-th highest score
    flat[i, order] = 250 - 20 * np.arange(K)
    labels.append(int(order[rank]))
  return x, np.array(labels, np.int64)


def weights(channels, swap01=False):
  w = np.zeros((H * W * channels, K), np.float32)
  w[np.arange(K), np.arange(K)] = 1.0
  if swap01:
    w[:, [0, 1]] = w[:, [1, 0]]
  return w


def graph_def(channels, swap01=False):
  with tf.Graph().as_default() as g:
    x = tf.compat.v1.placeholder(tf.float32, [None, H, W, channels], name="images")
    flat = tf.reshape(x, [-1, H * W * channels])
    tf.identity(tf.matmul(flat, tf.constant(weights(channels, swap01))), name="logits")
  return g.as_graph_def()


def nchw_onnx(channels):
  """Hand-made ONNX with an NCHW input: Transpose to NHWC, then the same weights."""
  nodes = [helper.make_node("Transpose", ["images"], ["nhwc"], perm=[0, 2, 3, 1]),
           helper.make_node("Reshape", ["nhwc", "shape"], ["flat"]),
           helper.make_node("MatMul", ["flat", "w"], ["logits"])]
  graph = helper.make_graph(
      nodes, "nchw",
      [helper.make_tensor_value_info("images", onnx.TensorProto.FLOAT, [None, channels, H, W])],
      [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [None, K])],
      [numpy_helper.from_array(np.array([-1, H * W * channels], np.int64), "shape"),
       numpy_helper.from_array(weights(channels), "w")])
  return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def write_png_tfrecord(path, x, y, encode=tf.io.encode_png):
  with tf.io.TFRecordWriter(path) as w:
    for image, label in zip(x, y):
      ex = tf.train.Example(features=tf.train.Features(feature={
          "image/encoded": tf.train.Feature(
              bytes_list=tf.train.BytesList(value=[encode(image).numpy()])),
          "image/class/label": tf.train.Feature(int64_list=tf.train.Int64List(value=[label]))}))
      w.write(ex.SerializeToString())


def write_class_folder(root, x, y):
  for k in range(K):  # every class gets its folder, so sorted names are ids 0..9
    os.makedirs(os.path.join(root, f"class{k}"))
  for i, (image, label) in enumerate(zip(x, y)):
    with open(os.path.join(root, f"class{label}", f"{i:03d}.png"), "wb") as f:
      f.write(tf.io.encode_png(image).numpy())


def write_idx(path, array):
  """A gzip'ed IDX file: 0x0000, type 0x08 (uint8), rank, big-endian dimensions, data."""
  array = np.asarray(array, np.uint8)
  data = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
  with open(path, "wb") as f:
    f.write(gzip.compress(data + array.tobytes(), mtime=0))


def write_idx_dir(root, x, y):
  os.makedirs(root)
  write_idx(os.path.join(root, "t10k-images-idx3-ubyte.gz"), x[..., 0])
  write_idx(os.path.join(root, "t10k-labels-idx1-ubyte.gz"), y)


def _cli(*args):
  env = dict(os.environ, PYTHONPATH=_ROOT, TF_CPP_MIN_LOG_LEVEL="3")
  return subprocess.run([*binaries.command("evaluate"), *args], capture_output=True, text=True,
                        env=env, timeout=300, check=False)


class MetricsTest(absltest.TestCase):

  def test_ranks_break_ties_like_argmax(self):
    scores = np.array([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, np.nan, 2.0], [3.0, 2.0, 1.0]])
    labels = np.array([0, 1, 1, 2])
    self.assertEqual(metrics.label_ranks(scores, labels).tolist(), [0, 1, 3, 2])
    counter = metrics.AccuracyCounter()
    counter.add(scores, labels)
    self.assertEqual(counter.result(), metrics.Accuracy(4, 0.25, 0.75, 3))

  def test_agreement_numbers(self):
    counter = metrics.AgreementCounter()
    model = np.array([[0.0, 0.0], [1.0, 0.0]])
    reference = np.array([[np.log(3.0), 0.0], [0.0, 1.0]])
    counter.add(model, reference)
    result = counter.result()
    self.assertEqual(result.top1, 0.5)  # argmax 0 = 0; 0 != 1
    kl_first = 0.75 * np.log(0.75 / 0.5) + 0.25 * np.log(0.25 / 0.5)
    p = np.exp(1.0) / (1 + np.exp(1.0))  # softmax([1, 0])[0]
    kl_second = (1 - p) * np.log((1 - p) / p) + p * np.log(p / (1 - p))
    self.assertAlmostEqual(result.mean_kl, (kl_first + kl_second) / 2, places=12)
    self.assertEqual(result.max_abs_diff, np.log(3.0))


class EvaluateTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    import tf2onnx  # pylint: disable=g-import-not-at-top
    # A fresh directory: the default one outlives runs outside Bazel.
    tmp = tempfile.mkdtemp(dir=absltest.get_default_test_tmpdir())
    gd = graph_def(1)
    cls.pb = os.path.join(tmp, "gray.pb")
    with open(cls.pb, "wb") as f:
      f.write(gd.SerializeToString())
    proto, _ = tf2onnx.convert.from_graph_def(gd, input_names=["images:0"],
                                              output_names=["logits:0"], opset=17)
    cls.onnx = os.path.join(tmp, "gray.onnx")
    onnx.save(proto, cls.onnx)
    cls.swapped = os.path.join(tmp, "swapped.pb")
    with open(cls.swapped, "wb") as f:
      f.write(graph_def(1, swap01=True).SerializeToString())
    cls.rgb_pb = os.path.join(tmp, "rgb.pb")
    with open(cls.rgb_pb, "wb") as f:
      f.write(graph_def(3).SerializeToString())
    cls.rgb_onnx = os.path.join(tmp, "rgb_nchw.onnx")
    onnx.save(nchw_onnx(3), cls.rgb_onnx)

    cls.x, cls.y = make_images(1, seed=0)
    cls.data = {"npz": os.path.join(tmp, "gray.npz"), "tfrecord": os.path.join(tmp, "g.tfrecord"),
                "folder": os.path.join(tmp, "gray_folder"), "idx": os.path.join(tmp, "idx")}
    np.savez(cls.data["npz"], x=cls.x[..., 0], y=cls.y)  # [N, H, W]: grayscale, no channel axis
    write_png_tfrecord(cls.data["tfrecord"], cls.x, cls.y)
    write_class_folder(cls.data["folder"], cls.x, cls.y)
    write_idx_dir(cls.data["idx"], cls.x, cls.y)
    cls.rgb_x, cls.rgb_y = make_images(3, seed=1)
    cls.rgb_folder = os.path.join(tmp, "rgb_folder")
    write_class_folder(cls.rgb_folder, cls.rgb_x, cls.rgb_y)

  def _eval(self, model, data, **kwargs):
    kwargs.setdefault("preprocess", SCALE)
    kwargs.setdefault("batch_size", 5)  # several batches, the last one short
    spec = model if isinstance(model, evaluate.ModelSpec) else evaluate.ModelSpec(model)
    return evaluate.evaluate(spec, data, evaluate.Options(**kwargs))

  @parameterized.product(source=["npz", "tfrecord", "folder", "idx"], model=["pb", "onnx"])
  def test_exact_accuracy(self, source, model):
    doc = self._eval(getattr(self, model), self.data[source])
    self.assertEqual(doc["samples"], 12)
    self.assertEqual(doc["classes"], 10)
    self.assertEqual(doc["top1"], TOP1)
    self.assertEqual(doc["top5"], TOP5)
    self.assertEqual(doc["data"]["format"], source)
    self.assertEqual(doc["model"]["layout"], "NHWC")  # tf2onnx keeps the NHWC input
    self.assertEqual(doc["model"]["format"], {"pb": "graphdef", "onnx": "onnx"}[model])

  def test_fashion_mnist_shorthand_with_data_dir(self):
    doc = self._eval(self.pb, "fashion-mnist:test", data_dir=self.data["idx"])
    self.assertEqual((doc["samples"], doc["top1"], doc["top5"]), (12, TOP1, TOP5))

  def test_rgb_nhwc_graph_and_nchw_onnx_with_mean_std(self):
    # Per-channel means that differ by less than the gap between two class scores
    # (20/255), so that the order of the scores, and so the accuracy, stays the same.
    prep = preprocess.Preprocess(scale=1 / 255, mean=(0.5, 0.49, 0.48), std=(0.2, 0.2, 0.2))
    for model, layout in ((self.rgb_pb, "NHWC"), (self.rgb_onnx, "NCHW")):
      doc = self._eval(model, self.rgb_folder, preprocess=prep)
      self.assertEqual(doc["model"]["layout"], layout)
      self.assertEqual((doc["samples"], doc["top1"], doc["top5"]), (12, TOP1, TOP5))
    doc = self._eval(self.rgb_onnx, self.rgb_folder, preprocess=prep,
                     reference=evaluate.ModelSpec(self.rgb_pb))
    self.assertEqual(doc["agreement"]["top1"], 1.0)
    self.assertLess(doc["agreement"]["max_abs_diff"], 1e-5)

  def test_resize(self):
    big = self.x.repeat(2, axis=1).repeat(2, axis=2)  # every pixel a 2x2 block: exact halving
    path = os.path.join(self.create_tempdir().full_path, "big.npz")
    np.savez(path, x=big, y=self.y)
    prep = preprocess.Preprocess(resize=(H, W), scale=1 / 255)
    doc = self._eval(self.pb, path, preprocess=prep)
    self.assertEqual((doc["samples"], doc["top1"], doc["top5"]), (12, TOP1, TOP5))
    with self.assertRaisesRegex(errors.InputError, r"gives samples of shape \[8,10,1\], but "
                                r"model .* takes \[H, W, C\] \[4,5,1\]; give --resize=H,W"):
      self._eval(self.pb, path)

  def test_agreement(self):
    doc = self._eval(self.pb, self.data["npz"], reference=evaluate.ModelSpec(self.pb))
    self.assertEqual(doc["agreement"], {"top1": 1.0, "mean_kl": 0.0, "max_abs_diff": 0.0})
    doc = self._eval(self.onnx, self.data["npz"], reference=evaluate.ModelSpec(self.pb))
    self.assertEqual(doc["agreement"]["top1"], 1.0)
    self.assertLess(doc["agreement"]["max_abs_diff"], 1e-6)
    self.assertLess(doc["agreement"]["mean_kl"], 1e-9)
    # Swapping the scores of classes 0 and 1 changes the prediction exactly where the
    # model predicts class 0 or 1.
    flat = self.x.reshape(len(self.x), -1).astype(np.float64) / 255
    predicted = flat[:, :K].argmax(axis=1)
    doc = self._eval(self.pb, self.data["npz"], reference=evaluate.ModelSpec(self.swapped))
    self.assertEqual(doc["agreement"]["top1"], float(np.mean(predicted > 1)))
    self.assertAlmostEqual(doc["agreement"]["max_abs_diff"],
                           float(np.abs(flat[:, 0] - flat[:, 1]).max()), places=6)
    self.assertEqual(doc["top1"], TOP1)  # accuracy is the model's, not the reference's

  def test_saved_model(self):
    module = tf.Module()
    module.w = tf.Variable(weights(1))
    module.serve = tf.function(
        lambda images: {"logits": tf.matmul(tf.reshape(images, [-1, H * W]), module.w)},
        input_signature=[tf.TensorSpec([None, H, W, 1], tf.float32, name="images")])
    path = os.path.join(self.create_tempdir().full_path, "sm")
    tf.saved_model.save(module, path, signatures={"serving_default": module.serve})
    doc = self._eval(path, self.data["tfrecord"])
    self.assertEqual((doc["samples"], doc["top1"], doc["top5"]), (12, TOP1, TOP5))
    self.assertEqual(doc["model"]["format"], "saved_model")
    self.assertEqual(doc["model"]["output_key"], "logits")

  def test_report_file(self):
    report = os.path.join(self.create_tempdir().full_path, "r.json")
    doc = self._eval(self.pb, self.data["idx"], report=report, max_samples=6)
    with open(report) as f:
      written = json.load(f)
    self.assertEqual(written, json.loads(json.dumps(doc)))
    self.assertEqual(written["samples"], 6)
    self.assertEqual(written["top1"], 4 / 6)  # the first six ranks: 0, 0, 0, 0, 1, 2
    self.assertEqual(written["top5"], 1.0)
    self.assertEqual(written["model"]["path"], self.pb)
    self.assertEqual(written["data"]["spec"], self.data["idx"])
    self.assertContainsSubset({"load_s", "eval_s", "model_s", "total_s"}, written["timings"])
    self.assertNotIn("agreement", written)

  def test_channel_mismatch_of_encoded_images(self):
    with self.assertRaisesRegex(errors.InputError, r"the images have 3 channel\(s\), the model "
                                "takes 1"):
      self._eval(self.pb, self.rgb_folder)

  def test_empty_tfrecord(self):
    path = os.path.join(self.create_tempdir().full_path, "empty.tfrecord")
    with tf.io.TFRecordWriter(path):
      pass
    with self.assertRaisesRegex(errors.InputError, "has no samples; the dataset is empty"):
      self._eval(self.pb, path)

  def test_wrong_tfrecord_keys(self):
    with self.assertRaisesRegex(errors.InputError, "--image_key/--label_key"):
      self._eval(self.pb, self.data["tfrecord"], image_key="image/png")

  def test_mean_length(self):
    with self.assertRaisesRegex(errors.UsageError, "--mean has 2 values, but the samples have 1"):
      self._eval(self.pb, self.data["npz"], preprocess=preprocess.Preprocess(mean=(1.0, 2.0)))

  def test_cli_writes_report(self):
    report = os.path.join(self.create_tempdir().full_path, "r.json")
    r = _cli(f"--model={self.onnx}", f"--data={self.data['folder']}", "--scale=1/255",
             f"--reference={self.pb}", f"--report={report}")
    self.assertEqual(r.returncode, 0, r.stderr[-2000:])
    with open(report) as f:
      doc = json.load(f)
    self.assertEqual((doc["samples"], doc["top1"], doc["top5"]), (12, TOP1, TOP5))
    self.assertEqual(doc["agreement"]["top1"], 1.0)
    self.assertIn("top-1      0.3333", r.stdout)

  def _bad_npz(self, x, y):
    path = os.path.join(self.create_tempdir().full_path, "bad.npz")
    np.savez(path, x=x, y=y)
    return path

  def test_cli_bad_input(self):
    wrong_label = self.y.copy()
    wrong_label[7] = K
    negative = self.y.copy()
    negative[0] = -1
    small = self._bad_npz(np.zeros((3, 5, 5), np.uint8), [0, 1, 2])
    cases = [
        ([f"--model={self.pb}", "--data=/nonexistent/data.npz"],
         "data '/nonexistent/data.npz' does not exist"),
        ([f"--model={self.pb}", f"--data={self._bad_npz(self.x, wrong_label)}"],
         "has label 10, but model"),
        ([f"--model={self.onnx}", f"--data={self._bad_npz(self.x, negative)}"],
         "has label -1, but model"),
        ([f"--model={self.pb}", f"--data={small}"],
         "gives samples of shape [5,5,1], but model"),
        ([f"--model={self.pb}", f"--data={self._bad_npz(np.zeros((0, H, W)), np.zeros(0, int))}"],
         "has no samples"),
        (["--model=/nonexistent/model.pb", f"--data={self.data['npz']}"],
         "input '/nonexistent/model.pb' does not exist"),
    ]
    for args, needle in cases:
      with self.subTest(needle=needle):
        out_dir = self.create_tempdir().full_path
        report = os.path.join(out_dir, "report.json")
        r = _cli(*args, f"--report={report}")
        self.assertEqual(r.returncode, 2, r.stderr[-2000:])
        lines = [l for l in r.stderr.splitlines() if l.startswith("evaluate: ")]
        self.assertLen(lines, 1, r.stderr[-2000:])
        self.assertTrue(lines[0].startswith("evaluate: error: "), lines[0])
        self.assertIn(needle, lines[0])
        self.assertNotIn("Traceback", r.stderr)
        self.assertEqual(r.stdout, "")
        self.assertFalse(os.path.exists(report))
        self.assertEqual(os.listdir(out_dir), [])


if __name__ == "__main__":
  absltest.main()
