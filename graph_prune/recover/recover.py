"""Recovery after pruning, on the frozen graph itself: distillation, fine-tuning, or
re-estimating the per-channel normalisation from calibration data.

TensorFlow only: the pruned graph's weight constants become variables
(adapters.tf_trainable), are trained or recalibrated, and go back into the
constants, so the result is written in the input's own format. Training runs under
the tf.distribute strategy the flag names, so one command serves a CPU, local GPUs
or a TPU.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Optional

import numpy as np

from graph_prune import errors
from graph_prune.adapters import tf_model
from graph_prune.adapters import tf_trainable
from graph_prune.data import preprocess as preprocess_lib
from graph_prune.data import sources

tf = tf_model.tf

DISTILL, FINETUNE, BN_RECALIBRATE = "distill", "finetune", "bn_recalibrate"
METHODS = (DISTILL, FINETUNE, BN_RECALIBRATE)
STRATEGIES = ("default", "mirrored", "tpu")


@dataclasses.dataclass(frozen=True)
class Options:
  method: str = DISTILL
  data: str = ""                   # data spec (graph_prune.data.sources)
  data_format: str = "auto"
  data_dir: Optional[str] = None   # Fashion-MNIST directory for 'fashion-mnist:SPLIT'
  split: str = "train"             # IDX split of a directory
  preprocess: preprocess_lib.Preprocess = preprocess_lib.Preprocess()
  batch_size: int = 64             # global batch, split over the strategy's replicas
  train_steps: int = 1000          # gradient steps per recovery (per increment with --steps)
  learning_rate: float = 1e-3      # peak; linear warm-up then cosine decay
  temperature: float = 4.0         # distillation temperature
  distill_weight: float = 0.0      # finetune: weight of the distillation term in the loss
  calibration_samples: int = 2048  # bn_recalibrate
  holdout_samples: int = 2000      # kept out of training; agreement measured on them
  strategy: str = "default"
  checkpoint_dir: Optional[str] = None
  checkpoint_every: int = 200
  log_every: int = 100
  seed: int = 0
  output: Optional[str] = None     # the class-score output (default: the first output)


def check(options: Options) -> None:
  """Flag errors, before any work."""
  if options.method not in METHODS:
    raise errors.UsageError(f"unknown --recover '{options.method}'; choose one of "
                            f"{', '.join(METHODS)}")
  if not options.data:
    raise errors.UsageError(f"--recover={options.method} needs --recover_data (images the "
                            "model takes; labels only for finetune)")
  if options.strategy not in STRATEGIES:
    raise errors.UsageError(f"unknown --strategy '{options.strategy}'; choose one of "
                            f"{', '.join(STRATEGIES)}")
  for name, value, least in (("recover_batch_size", options.batch_size, 1),
                             ("recover_train_steps", options.train_steps, 0),
                             ("calibration_samples", options.calibration_samples, 1),
                             ("checkpoint_every", options.checkpoint_every, 1),
                             ("log_every", options.log_every, 1)):
    if value < least:
      raise errors.UsageError(f"--{name} is {value}; it must be at least {least}")
  if not options.learning_rate > 0 or not options.temperature > 0:
    raise errors.UsageError("--learning_rate and --temperature must be positive")
  if not 0.0 <= options.distill_weight <= 1.0:
    raise errors.UsageError(f"--distill_weight is {options.distill_weight}; it must be in [0, 1]")


def make_strategy(name: str):
  """default: the one device TensorFlow picks; mirrored: all local GPUs (without
  GPUs, every logical CPU device: that is how the tests run two replicas);
  tpu: the TPU system this host reaches."""
  if name == "mirrored":
    devices = (tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU"))
    return tf.distribute.MirroredStrategy([d.name for d in devices])
  if name == "tpu":
    try:
      resolver = tf.distribute.cluster_resolver.TPUClusterResolver()
      tf.config.experimental_connect_to_cluster(resolver)
      tf.tpu.experimental.initialize_tpu_system(resolver)
    except (ValueError, RuntimeError, tf.errors.OpError) as e:
      raise errors.UsageError(f"--strategy=tpu: no TPU found ({str(e).splitlines()[0]})"
                              ) from None
    return tf.distribute.TPUStrategy(resolver)
  return tf.distribute.get_strategy()


@dataclasses.dataclass(frozen=True)
class Data:
  """Preprocessed samples split into a holdout part and a training part."""
  train: Any           # tf.data.Dataset of (x, label), unbatched
  holdout: np.ndarray  # [H, ...] float32
  train_count: Optional[int]
  spec: str


def load_data(model: tf_model.TFModel, options: Options, labels: bool) -> Data:
  """The recovery data, checked against the model's input."""
  if len(model.inputs) != 1:
    raise errors.UsageError(f"recovery feeds one input; the model has {len(model.inputs)}")
  shape = _input_shape(model)
  want = tuple(shape[1:]) if shape is not None else None
  source = sources.resolve(options.data, options.data_format, options.data_dir, options.split)
  examples = sources.examples(source, labels=labels)
  got = examples.sample_shape
  if got is not None and options.preprocess.resize and len(got) == 3:
    got = tuple(options.preprocess.resize) + got[2:]
  channels = want[-1] if want else None
  preprocess_lib.check(options.preprocess, channels, examples.images)
  if got is not None and want is not None and (
      len(got) != len(want) or any(g and w and g != w for g, w in zip(got, want))):
    raise errors.InputError(f"recovery data '{options.data}' gives samples of shape "
                            f"{list(got)}, but the model takes {list(want)}; give --resize=H,W "
                            "or data of the model's input shape")
  ds = examples.dataset.map(preprocess_lib.mapper(options.preprocess, want),
                            num_parallel_calls=tf.data.AUTOTUNE)
  holdout = options.holdout_samples
  if examples.count is not None:
    holdout = min(holdout, examples.count // 5)
  try:
    held = [x for x, _ in ds.take(holdout).batch(1024).as_numpy_iterator()]
  except tf.errors.OpError as e:
    raise errors.InputError(f"reading recovery data '{options.data}' failed: "
                            f"{e.message.strip().splitlines()[0]}") from None
  held = np.concatenate(held) if held else np.zeros((0,) + tuple(want or ()), np.float32)
  count = examples.count - holdout if examples.count is not None else None
  if count == 0:
    raise errors.InputError(f"recovery data '{options.data}' has no samples left for training")
  return Data(ds.skip(holdout), held, count, options.data)


def _input_shape(model: tf_model.TFModel):
  """The input's shape: a Placeholder's attribute, read without importing the graph
  (which would copy every weight); TensorFlow's shape inference for other tensors."""
  name = model.inputs[0]
  node = next((n for n in model.graph_def.node if n.name == name.split(":")[0]), None)
  if node is not None and node.op == "Placeholder" and name.endswith(":0"):
    shape = node.attr["shape"].shape
    return None if shape.unknown_rank else tuple(d.size if d.size >= 0 else None
                                                 for d in shape.dim)
  return tf_model.to_view(model).shape(name)


def kept_logits(model: tf_model.TFModel, options: Options) -> str:
  output = options.output
  if output and output not in model.outputs:
    keys = dict(model.signature.outputs) if model.signature else {}
    if output not in keys:
      raise errors.UsageError(f"--recover_output '{output}' is not an output of the model "
                              f"({', '.join(model.outputs)})")
    output = keys[output]
  return tf_trainable.logits_tensor(model, output)


def agreement(teacher, student, x: np.ndarray, batch: int = 512) -> Optional[float]:
  """Fraction of samples on which both functions give the same top class."""
  if len(x) == 0:
    return None
  same = 0
  for i in range(0, len(x), batch):
    xb = tf.constant(x[i:i + batch])
    t, s = teacher(xb), student(xb)
    same += int(np.sum(np.argmax(t, axis=-1) == np.argmax(s, axis=-1)))
  return same / len(x)


def frozen_function(model: tf_model.TFModel, fetch: str):
  fn, _ = tf_model.concrete_function(model.graph_def, list(model.inputs), [fetch])
  return lambda x: fn(x)[0]


def recover(original: tf_model.TFModel, pruned: tf_model.TFModel,
            kept: Mapping[str, np.ndarray], options: Options,
            checkpoint_dir: Optional[str] = None) -> tuple[tf_model.TFModel, dict]:
  """The pruned model with recovered weights, and the recovery's report.

  `kept` maps a tensor name to the original channel positions it still carries
  (bn_recalibrate matches the original's statistics on those channels).
  """
  check(options)
  from graph_prune.recover import calibrate  # pylint: disable=g-import-not-at-top
  from graph_prune.recover import train  # pylint: disable=g-import-not-at-top
  logits = kept_logits(pruned, options)
  data = load_data(pruned, options, labels=options.method == FINETUNE)
  teacher = frozen_function(original, logits)
  before = agreement(teacher, frozen_function(pruned, logits), data.holdout)
  if options.method == BN_RECALIBRATE:
    out, doc = calibrate.recalibrate(original, pruned, kept, data, options)
  else:
    out, doc = train.train(teacher, pruned, logits, data, options,
                           checkpoint_dir or options.checkpoint_dir)
  after = agreement(teacher, frozen_function(out, logits), data.holdout)
  doc.update(method=options.method, data=options.data, logits=logits,
             holdout_samples=len(data.holdout), holdout_agreement_before=before,
             holdout_agreement_after=after)
  return out, doc


def fingerprint(pruned: tf_model.TFModel, options: Options) -> str:
  """Identifies a recovery: the pruned graph and every option that changes its result."""
  import hashlib  # pylint: disable=g-import-not-at-top
  h = hashlib.sha256(pruned.graph_def.SerializeToString(deterministic=True))
  fields = dataclasses.asdict(options)
  for key in ("checkpoint_dir", "checkpoint_every", "log_every"):
    fields.pop(key)
  h.update(repr(sorted(fields.items())).encode())
  return h.hexdigest()


def ensure_dir(path: str) -> str:
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise errors.UsageError(f"cannot create --checkpoint_dir '{path}' ({e.strerror})") from None
  return path
