"""Labelled data sources: where the samples are, and a tf.data pipeline that reads them.

A data spec names one of:
  - a .npz file with arrays `x` (samples) and `y` (integer labels),
  - TFRecord files of tf.train.Examples holding an encoded image (JPEG/PNG/BMP/GIF)
    and an integer label (a file, a glob pattern, or a directory of *.tfrecord*),
  - a folder with one sub-folder per class (sorted sub-folder names -> label ids),
  - IDX files (a directory with the train/test IDX files, or an images IDX file),
    with the shorthand 'fashion-mnist:test' / 'fashion-mnist:train'.

Every source yields (sample, int64 label). Images come out as [H, W, C] in their
stored dtype: grayscale [N, H, W] arrays gain a channel axis, encoded images are
decoded with their own channel count. Scaling and resizing belong to
graph_prune.data.preprocess.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import zipfile
from typing import Optional

import numpy as np

from graph_prune import errors
from graph_prune import lazy
from graph_prune.data import idx

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
tf = lazy.module("tensorflow")

NPZ, TFRECORD, FOLDER, IDX = "npz", "tfrecord", "folder", "idx"
FORMATS = (NPZ, TFRECORD, FOLDER, IDX)
FASHION_MNIST = "fashion-mnist"
IMAGE_KEY = "image/encoded"
LABEL_KEY = "image/class/label"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif")
_TFRECORD_MARKERS = (".tfrecord", ".tfrecords", ".tfrec", ".record")


@dataclasses.dataclass(frozen=True)
class Source:
  """A resolved data spec: its format and the files that hold it."""
  format: str
  spec: str
  paths: tuple[str, ...]
  classes: tuple[str, ...] = ()   # folder: class names in label-id order
  labels: tuple[int, ...] = ()    # folder: the label of each path

  def to_json(self) -> dict:
    doc = {"spec": self.spec, "format": self.format}
    if self.format == FOLDER:
      doc["classes"] = list(self.classes)  # the images themselves are too many to list
    else:
      doc["paths"] = list(self.paths)
    return doc


@dataclasses.dataclass(frozen=True)
class Examples:
  """The samples of a source as a tf.data.Dataset of (sample, int64 label)."""
  dataset: tf.data.Dataset
  sample_shape: Optional[tuple[Optional[int], ...]]  # static shape; None dims vary
  count: Optional[int]  # number of samples, where known before reading them
  images: bool          # samples are [H, W, C] images (resize and mean/std apply)


def _is_tfrecord(path: str) -> bool:
  return any(m in os.path.basename(path) for m in _TFRECORD_MARKERS)


def _is_idx_images(path: str) -> bool:
  return "-images-idx" in os.path.basename(path)


def _idx_split_present(data_dir: str, split: str) -> bool:
  try:
    idx.split_files(data_dir, split)
    return True
  except errors.GraphPruneError:
    return False


def _subdirs(path: str) -> list[str]:
  return sorted(d for d in os.listdir(path)
                if not d.startswith(".") and os.path.isdir(os.path.join(path, d)))


def resolve(spec: str, data_format: str = "auto", fashion_mnist_dir: Optional[str] = None,
            split: str = "test") -> Source:
  """Finds the format and files of a data spec; reads no samples.

  `split` picks the IDX files of a directory; 'fashion-mnist:SPLIT' overrides it and
  reads fashion_mnist_dir (default: where dataset-fashion-mnist installs the files).
  """
  if data_format not in ("auto",) + FORMATS:
    raise errors.UsageError(f"unknown --data_format '{data_format}'; use auto, "
                            f"{', '.join(FORMATS)}")
  if spec.startswith(FASHION_MNIST + ":"):
    split = spec.split(":", 1)[1]
    data_dir = fashion_mnist_dir or idx.FASHION_MNIST_DIR
    if not os.path.isdir(data_dir):
      raise errors.InputError(f"Fashion-MNIST directory '{data_dir}' does not exist; install "
                              "the Debian package dataset-fashion-mnist or give --data_dir")
    return Source(IDX, spec, idx.split_files(data_dir, split))
  paths = [spec]
  if not os.path.exists(spec):
    paths = sorted(glob.glob(spec)) if glob.has_magic(spec) else []
    if not paths:
      raise errors.InputError(f"data '{spec}' does not exist; give a .npz file, TFRecord "
                              "files, a folder of class folders, IDX files or "
                              "fashion-mnist:test")
  fmt = data_format if data_format != "auto" else _detect(spec, paths, split)
  if fmt == NPZ:
    return _file_source(NPZ, spec, paths)
  if fmt == TFRECORD:
    return _tfrecord_source(spec, paths)
  if fmt == FOLDER:
    return _folder_source(spec, paths)
  return _idx_source(spec, paths, split)


def _detect(spec: str, paths: list[str], split: str) -> str:
  first = paths[0]
  if os.path.isdir(first) and len(paths) == 1:
    if _idx_split_present(first, split):
      return IDX
    if _subdirs(first):
      return FOLDER
    if any(_is_tfrecord(f) for f in os.listdir(first)):
      return TFRECORD
    raise errors.InputError(f"directory '{spec}' holds no IDX files for split '{split}', no "
                            "class sub-folders and no *.tfrecord files; give --data_format")
  if first.endswith(".npz"):
    return NPZ
  if all(_is_tfrecord(p) for p in paths):
    return TFRECORD
  if _is_idx_images(first):
    return IDX
  raise errors.InputError(f"cannot tell the format of data '{spec}' from its name; give "
                          f"--data_format ({', '.join(FORMATS)})")


def _file_source(fmt: str, spec: str, paths: list[str]) -> Source:
  if len(paths) != 1 or not os.path.isfile(paths[0]):
    raise errors.InputError(f"data '{spec}' is not one {fmt} file")
  return Source(fmt, spec, (paths[0],))


def _tfrecord_source(spec: str, paths: list[str]) -> Source:
  if len(paths) == 1 and os.path.isdir(paths[0]):
    root = paths[0]
    paths = sorted(os.path.join(root, f) for f in os.listdir(root)
                   if _is_tfrecord(f) and os.path.isfile(os.path.join(root, f)))
    if not paths:
      raise errors.InputError(f"directory '{spec}' holds no *.tfrecord files")
  return Source(TFRECORD, spec, tuple(paths))


def _folder_source(spec: str, paths: list[str]) -> Source:
  root = paths[0]
  if len(paths) != 1 or not os.path.isdir(root):
    raise errors.InputError(f"data '{spec}' is not a directory of class folders")
  classes = _subdirs(root)
  if not classes:
    raise errors.InputError(f"directory '{spec}' has no class sub-folders")
  files, labels = [], []
  for label, name in enumerate(classes):
    # Sorted walk: the same folder gives the same sample order on every run.
    for dirpath, dirnames, filenames in os.walk(os.path.join(root, name)):
      dirnames.sort()
      for f in sorted(filenames):
        if f.lower().endswith(IMAGE_EXTENSIONS):
          files.append(os.path.join(dirpath, f))
          labels.append(label)
  if not files:
    raise errors.InputError(f"the class folders of '{spec}' hold no images "
                            f"({', '.join(IMAGE_EXTENSIONS)}); the dataset is empty")
  return Source(FOLDER, spec, tuple(files), tuple(classes), tuple(labels))


def _idx_source(spec: str, paths: list[str], split: str) -> Source:
  first = paths[0]
  if len(paths) == 1 and os.path.isdir(first):
    return Source(IDX, spec, idx.split_files(first, split))
  if len(paths) != 1:
    raise errors.InputError(f"data '{spec}' matches {len(paths)} files; give one IDX images "
                            "file or its directory")
  return Source(IDX, spec, (first, idx.labels_file_for(first)))


def examples(source: Source, image_key: str = IMAGE_KEY, label_key: str = LABEL_KEY,
             labels: bool = True) -> Examples:
  """The source's samples; in-memory formats are read and checked here, the others
  (decoded in parallel) while the pipeline runs. With labels=False (distillation
  needs none) a .npz may hold `x` alone and TFRecords may lack the label; missing
  labels read as -1."""
  if source.format == NPZ:
    x, y = _read_npz(source.paths[0], labels)
    return _in_memory(x, y, source)
  if source.format == IDX:
    x, y = idx.read_pair(*source.paths)
    return _in_memory(x, y, source)
  if source.format == FOLDER:
    files = tf.data.Dataset.from_tensor_slices(
        (list(source.paths), np.asarray(source.labels, np.int64)))
    ds = files.map(lambda path, label: (_decode(tf.io.read_file(path)), label),
                   num_parallel_calls=tf.data.AUTOTUNE)
    return Examples(ds, (None, None, None), len(source.paths), True)
  features = {image_key: tf.io.FixedLenFeature([], tf.string),
              label_key: tf.io.FixedLenFeature([], tf.int64,
                                               default_value=None if labels else -1)}

  def parse(record):
    ex = tf.io.parse_single_example(record, features)
    return _decode(ex[image_key]), ex[label_key]
  # Records are read in file order (no interleave), so results do not depend on timing.
  ds = tf.data.TFRecordDataset(list(source.paths)).map(parse, num_parallel_calls=tf.data.AUTOTUNE)
  return Examples(ds, (None, None, None), None, True)


def _decode(data: tf.Tensor) -> tf.Tensor:
  # channels=0 keeps the file's own channel count: it is checked against the model
  # input, never converted silently.
  return tf.io.decode_image(data, channels=0, dtype=tf.uint8, expand_animations=False)


def _read_npz(path: str, labels: bool = True) -> tuple[np.ndarray, np.ndarray]:
  try:
    with np.load(path, allow_pickle=False) as npz:
      missing = [k for k in ("x", "y") if k not in npz.files and (labels or k == "x")]
      if missing:
        raise errors.InputError(f"'{path}' has no array {' or '.join(map(repr, missing))} (it "
                                f"has {', '.join(npz.files) or 'none'}); store samples as x "
                                "and labels as y")
      x = npz["x"]
      y = npz["y"] if "y" in npz.files else np.full(len(x), -1, np.int64)
  except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
    raise errors.InputError(f"cannot read '{path}' as .npz ({str(e).splitlines()[0]})") from None
  if y.ndim == 2 and y.shape[1] == 1:
    y = y[:, 0]
  if y.ndim != 1 or y.dtype.kind not in "iu":
    raise errors.InputError(f"labels y of '{path}' are {y.dtype} {y.shape}; store integer class "
                            "ids of shape [N]")
  if x.ndim < 2 or x.shape[0] != y.shape[0]:
    raise errors.InputError(f"x of '{path}' has shape {x.shape}, which does not match the "
                            f"{y.shape[0]} labels in y")
  if x.dtype.kind not in "iuf" and x.dtype != np.bool_:
    raise errors.InputError(f"x of '{path}' holds {x.dtype}; store numbers")
  return x, y.astype(np.int64)


def _in_memory(x: np.ndarray, y: np.ndarray, source: Source) -> Examples:
  if x.shape[0] == 0:
    raise errors.InputError(f"data '{source.spec}' has no samples; the dataset is empty")
  images = x.ndim in (3, 4)
  if x.ndim == 3:  # grayscale [N, H, W]
    x = x[..., np.newaxis]
  ds = tf.data.Dataset.from_tensor_slices((x, y))
  return Examples(ds, tuple(x.shape[1:]), int(x.shape[0]), images)
