"""//tools:train_default --augment: the augmented training stream shows every image
once per pass with its own label, each image as one of its flips and shifts, drawn
anew each pass; mixup (which needs soft labels) is refused in one line."""

import subprocess

from absl.testing import absltest
import numpy as np

from graph_prune import errors
from graph_prune.recover import augment as augment_lib
from graph_prune.zoo import default_model
from tests import binaries


def _variants(image: np.ndarray, shift: int) -> list[np.ndarray]:
  """Every flip and shift of one [h, w, c] image that augment_lib.apply may draw
  (edges mirrored into the gap, as tf.pad SYMMETRIC does)."""
  h, w = image.shape[:2]
  out = []
  for flipped in (image, image[:, ::-1]):
    padded = np.pad(flipped, [(shift, shift), (shift, shift), (0, 0)], mode="symmetric")
    out += [padded[r:r + h, c:c + w] for r in range(2 * shift + 1)
            for c in range(2 * shift + 1)]
  return out


class TrainingStreamTest(absltest.TestCase):

  def test_every_image_once_per_pass_with_its_label(self):
    # Constant images: flips and shifts leave them as they are, so each batch row
    # names the image it came from.
    n, batch = 96, 32
    x = np.repeat(np.arange(n, dtype=np.float32)[:, None, None, None], 28 * 28, 1).reshape(
        n, 28, 28, 1)
    y = (np.arange(n) * 7 % 10).astype(np.int32)
    stream = default_model.training_stream(x, y, batch, 0, augment_lib.Augment(True, 2))
    passes = []
    for i, (images, labels) in enumerate(stream.take(2 * n // batch)):
      images, labels = images.numpy(), labels.numpy()
      self.assertEqual(images.shape, (batch, 28, 28, 1))
      index = images[:, 0, 0, 0].astype(np.int64)
      np.testing.assert_array_equal(images, x[index])
      np.testing.assert_array_equal(labels, y[index])
      if i % (n // batch) == 0:
        passes.append([])
      passes[-1] += list(index)
    self.assertLen(passes, 2)
    for seen in passes:
      self.assertEqual(sorted(seen), list(range(n)))
    self.assertNotEqual(passes[0], passes[1])    # reshuffled each pass

  def test_each_image_is_one_of_its_flips_and_shifts_drawn_anew(self):
    rng = np.random.default_rng(0)
    image = rng.random((28, 28, 1), dtype=np.float32)
    variants = _variants(image, 2)
    x, y = np.repeat(image[None], 64, 0), np.zeros(64, np.int32)
    stream = default_model.training_stream(x, y, 64, 0, augment_lib.Augment(True, 2))
    drawn = []
    for images, _ in stream.take(2):
      which = []
      for out in images.numpy():
        match = [k for k, v in enumerate(variants) if np.array_equal(out, v)]
        self.assertNotEmpty(match, "an augmented image that no flip or shift gives")
        which.append(match[0])
      drawn.append(which)
    # 50 variants over 64 draws: many of them, not the image alone, and not the
    # same draws in the second batch (a seed of its own per batch).
    self.assertGreater(len(set(drawn[0])), 20)
    self.assertNotEqual(drawn[0], drawn[1])

  def test_mixup_is_refused(self):
    with self.assertRaisesRegex(errors.UsageError, "mixup"):
      default_model.train("/nonexistent", self.create_tempdir().full_path,
                          augment=augment_lib.Augment(mixup=0.4))
    proc = subprocess.run(binaries.command("train_default") + ["--augment=mixup=0.4"],
                          capture_output=True, text=True, env=binaries.env(), timeout=300)
    self.assertEqual(proc.returncode, 2)
    lines = proc.stderr.strip().splitlines()
    self.assertLen(lines, 1, proc.stderr)
    self.assertStartsWith(lines[0], "train_default: error: --augment: mixup")

  def test_gap_compare_with_augment_is_refused(self):
    proc = subprocess.run(binaries.command("train_default") + ["--gap_compare", "--augment=flip"],
                          capture_output=True, text=True, env=binaries.env(), timeout=300)
    self.assertEqual(proc.returncode, 2)
    self.assertEqual(proc.stderr.strip(),
                     "train_default: error: --augment is not used by --gap_compare")

  def test_flag_value_reads_back(self):
    for entries in (["flip"], ["shift=3"], ["flip", "shift=2"], ["mixup=0.4"]):
      augment = augment_lib.parse(entries)
      self.assertEqual(augment_lib.parse(augment.flag_value().split(",")), augment)
    self.assertEqual(augment_lib.Augment(True, 2).flag_value(), "flip,shift=2")


if __name__ == "__main__":
  absltest.main()
