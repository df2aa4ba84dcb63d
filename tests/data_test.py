"""graph_prune.data: the IDX reader, format detection of each source, and preprocessing
numbers (scale, mean/std, resize) checked value by value."""

import gzip
import os
import struct

import numpy as np
from absl.testing import absltest

from graph_prune import errors
from graph_prune.data import idx
from graph_prune.data import preprocess
from graph_prune.data import sources


def write_idx(path, array, compress=True):
  """An IDX file: 0x0000, type 0x08 (uint8), rank, big-endian dimensions, data."""
  array = np.asarray(array, np.uint8)
  data = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
  data += array.tobytes()
  with open(path, "wb") as f:
    f.write(gzip.compress(data, mtime=0) if compress else data)


class IdxTest(absltest.TestCase):

  def test_round_trip_gzip_and_raw(self):
    tmp = self.create_tempdir().full_path
    array = np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5)
    for compress in (True, False):
      path = os.path.join(tmp, f"a{compress}")
      write_idx(path, array, compress)
      out = idx.read_idx(path)
      self.assertEqual(out.dtype, np.uint8)
      np.testing.assert_array_equal(out, array)

  def test_int32_big_endian(self):
    path = os.path.join(self.create_tempdir().full_path, "i32")
    values = np.array([1, -2, 70000], ">i4")
    with open(path, "wb") as f:
      f.write(struct.pack(">HBBI", 0, 0x0C, 1, 3) + values.tobytes())
    np.testing.assert_array_equal(idx.read_idx(path), [1, -2, 70000])

  def test_bad_files(self):
    tmp = self.create_tempdir().full_path
    bad_magic = os.path.join(tmp, "magic")
    with open(bad_magic, "wb") as f:
      f.write(b"\x01\x02\x08\x01\x00\x00\x00\x01\x00")
    with self.assertRaisesRegex(errors.InputError, "bad IDX magic number 0x01020801"):
      idx.read_idx(bad_magic)
    short = os.path.join(tmp, "short")
    with open(short, "wb") as f:
      f.write(struct.pack(">HBB2I", 0, 0x08, 2, 3, 4) + bytes(11))
    with self.assertRaisesRegex(errors.InputError, "11 data bytes.*needs 12"):
      idx.read_idx(short)

  def test_labels_file_beside_images_file(self):
    tmp = self.create_tempdir().full_path
    write_idx(os.path.join(tmp, "t10k-images-idx3-ubyte.gz"), np.zeros((2, 3, 3)))
    write_idx(os.path.join(tmp, "t10k-labels-idx1-ubyte.gz"), [4, 7])
    labels = idx.labels_file_for(os.path.join(tmp, "t10k-images-idx3-ubyte.gz"))
    self.assertEqual(labels, os.path.join(tmp, "t10k-labels-idx1-ubyte.gz"))
    images, y = idx.read_pair(os.path.join(tmp, "t10k-images-idx3-ubyte.gz"), labels)
    self.assertEqual(images.shape, (2, 3, 3))
    self.assertEqual(y.dtype, np.int64)
    self.assertEqual(y.tolist(), [4, 7])

  def test_fashion_mnist_test_split(self):
    if not os.path.isdir(idx.FASHION_MNIST_DIR):
      self.skipTest("dataset-fashion-mnist is not installed")
    x, y = idx.load_split(idx.FASHION_MNIST_DIR, "test")
    self.assertEqual(x.shape, (10000, 28, 28, 1))
    self.assertEqual(x.dtype, np.float32)
    self.assertEqual(float(x.min()), 0.0)
    self.assertEqual(float(x.max()), 1.0)
    self.assertEqual(y.dtype, np.int32)
    self.assertEqual(np.bincount(y).tolist(), [1000] * 10)  # the test split is balanced
    self.assertEqual(y[:5].tolist(), [9, 2, 1, 1, 6])


class SourcesTest(absltest.TestCase):

  def test_detects_each_format(self):
    tmp = self.create_tempdir().full_path
    npz = os.path.join(tmp, "d.npz")
    np.savez(npz, x=np.zeros((3, 2, 2), np.uint8), y=np.array([0, 1, 2]))
    rec = os.path.join(tmp, "d.tfrecord")
    open(rec, "wb").close()
    folder = os.path.join(tmp, "folder")
    for name in ("b", "a", "c"):
      os.makedirs(os.path.join(folder, name))
    open(os.path.join(folder, "b", "x.png"), "wb").close()
    open(os.path.join(folder, "a", "notes.txt"), "wb").close()
    idx_dir = os.path.join(tmp, "idx")
    os.makedirs(idx_dir)
    write_idx(os.path.join(idx_dir, "t10k-images-idx3-ubyte.gz"), np.zeros((1, 2, 2)))
    write_idx(os.path.join(idx_dir, "t10k-labels-idx1-ubyte.gz"), [0])

    self.assertEqual(sources.resolve(npz).format, "npz")
    self.assertEqual(sources.resolve(rec).format, "tfrecord")
    self.assertEqual(sources.resolve(os.path.join(tmp, "*.tfrecord")).paths, (rec,))
    s = sources.resolve(folder)
    self.assertEqual((s.format, s.classes, s.labels), ("folder", ("a", "b", "c"), (1,)))
    s = sources.resolve(idx_dir)
    self.assertEqual(s.format, "idx")
    self.assertEqual(s.paths, (os.path.join(idx_dir, "t10k-images-idx3-ubyte.gz"),
                               os.path.join(idx_dir, "t10k-labels-idx1-ubyte.gz")))
    s = sources.resolve("fashion-mnist:test", fashion_mnist_dir=idx_dir)
    self.assertEqual(s.paths[0], os.path.join(idx_dir, "t10k-images-idx3-ubyte.gz"))
    with self.assertRaisesRegex(errors.InputError, "no train-images-idx3-ubyte.gz"):
      sources.resolve("fashion-mnist:train", fashion_mnist_dir=idx_dir)
    with self.assertRaisesRegex(errors.UsageError, "unknown split 'val'"):
      sources.resolve("fashion-mnist:val", fashion_mnist_dir=idx_dir)

  def test_missing_and_unknown(self):
    tmp = self.create_tempdir().full_path
    with self.assertRaisesRegex(errors.InputError, "data '/nonexistent/d.npz' does not exist"):
      sources.resolve("/nonexistent/d.npz")
    other = os.path.join(tmp, "d.csv")
    open(other, "w").close()
    with self.assertRaisesRegex(errors.InputError, "cannot tell the format"):
      sources.resolve(other)
    self.assertEqual(sources.resolve(other, data_format="npz").format, "npz")

  def test_npz_checks(self):
    tmp = self.create_tempdir().full_path
    path = os.path.join(tmp, "d.npz")
    np.savez(path, images=np.zeros((2, 2)), y=np.array([0, 1]))
    with self.assertRaisesRegex(errors.InputError, "no array 'x' .*it has images, y"):
      sources.examples(sources.resolve(path))
    np.savez(path, x=np.zeros((2, 2, 2)), y=np.array([0.0, 1.0]))
    with self.assertRaisesRegex(errors.InputError, "labels y .* are float64"):
      sources.examples(sources.resolve(path))
    np.savez(path, x=np.zeros((0, 2, 2)), y=np.zeros((0,), np.int64))
    with self.assertRaisesRegex(errors.InputError, "has no samples"):
      sources.examples(sources.resolve(path))
    np.savez(path, x=np.zeros((3, 2, 2), np.uint8), y=np.array([[0], [1], [2]]))
    ex = sources.examples(sources.resolve(path))
    self.assertEqual((ex.sample_shape, ex.count, ex.images), ((2, 2, 1), 3, True))


class PreprocessTest(absltest.TestCase):

  def test_parse(self):
    self.assertEqual(preprocess.parse_scale("1/255"), 1 / 255)
    self.assertEqual(preprocess.parse_scale("0.5"), 0.5)
    self.assertEqual(preprocess.parse_resize("224,192"), (224, 192))
    self.assertEqual(preprocess.parse_floats(["0.5", "1"], "mean"), (0.5, 1.0))
    for bad in ("1/0", "a"):
      with self.assertRaisesRegex(errors.UsageError, "--scale"):
        preprocess.parse_scale(bad)
    for bad in ("224", "0,3", "a,b"):
      with self.assertRaisesRegex(errors.UsageError, "--resize"):
        preprocess.parse_resize(bad)

  def test_check(self):
    with self.assertRaisesRegex(errors.UsageError, "--mean has 2 values, but the samples have 3"):
      preprocess.check(preprocess.Preprocess(mean=(1.0, 2.0)), 3, True)
    with self.assertRaisesRegex(errors.UsageError, "--std has a zero"):
      preprocess.check(preprocess.Preprocess(std=(1.0, 0.0, 1.0)), 3, True)
    with self.assertRaisesRegex(errors.UsageError, "--resize applies to images"):
      preprocess.check(preprocess.Preprocess(resize=(2, 2)), 4, False)

  def _run(self, x, prep, **kwargs):
    path = os.path.join(self.create_tempdir().full_path, "d.npz")
    np.savez(path, x=x, y=np.arange(len(x)))
    ex = sources.examples(sources.resolve(path))
    out = list(preprocess.batches(ex, prep, 2, **kwargs).as_numpy_iterator())
    return np.concatenate([b[0] for b in out]), np.concatenate([b[1] for b in out]), len(out)

  def test_scale_mean_std_per_channel(self):
    x = np.arange(3 * 2 * 2 * 3, dtype=np.uint8).reshape(3, 2, 2, 3)
    prep = preprocess.Preprocess(scale=0.5, mean=(1.0, 2.0, 3.0), std=(1.0, 2.0, 4.0))
    out, labels, batches = self._run(x, prep)
    want = (x.astype(np.float32) * 0.5 - np.float32([1, 2, 3])) / np.float32([1, 2, 4])
    np.testing.assert_allclose(out, want, rtol=0, atol=1e-6)
    self.assertEqual(out.dtype, np.float32)
    self.assertEqual(labels.tolist(), [0, 1, 2])
    self.assertEqual(batches, 2)  # batches of 2: [2, 1]

  def test_resize_of_2x2_blocks_is_exact(self):
    small = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 10
    big = small.repeat(2, axis=1).repeat(2, axis=2)  # [2, 6, 6]: every pixel a 2x2 block
    out, _, _ = self._run(big, preprocess.Preprocess(resize=(3, 3)))
    self.assertEqual(out.shape, (2, 3, 3, 1))
    np.testing.assert_array_equal(out[..., 0], small.astype(np.float32))

  def test_max_samples_and_shape_check(self):
    x = np.zeros((5, 2, 2), np.uint8)
    out, _, _ = self._run(x, preprocess.Preprocess(), max_samples=3, sample_shape=(2, 2, 1))
    self.assertEqual(out.shape, (3, 2, 2, 1))


if __name__ == "__main__":
  absltest.main()
