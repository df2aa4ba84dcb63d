"""The built-in models, trained on Fashion-MNIST and exported as a frozen GraphDef
and a SavedModel.

The default (models/default/) is a small VGG-style CNN with batch norm, the sample
input of //tools:prune: conv/batch-norm/ReLU blocks give the pruner channel groups
that cross batch norms, pools, a Flatten and Dense layers. The second
(models/resnet/, --arch=resnet) is a small ResNet with batch norm: residual
stages whose additions couple channels across blocks, identity blocks that
--mode=layer removes whole, projection blocks that it cannot. Fashion-MNIST is
read from the IDX files of the Debian package dataset-fashion-mnist, so training
needs no network access. //tools:train_default is the command; this module does
the work.
"""

import dataclasses
import os
import shutil
import tempfile
import time

from absl import logging

from graph_prune import errors
from graph_prune import files
from graph_prune.data import idx
from graph_prune.recover import augment as augment_lib

_INPUT_NAME = "images"
_OUTPUT_NAME = "logits"
_NUM_CLASSES = 10
_EVAL_BATCH = 1000  # Bounds the activation memory of inference on the 10k test images.


# --- Model ---------------------------------------------------------------------------


def build_model():
  """VGG-style CNN, ~290k float32 weights (~1.1 MB); outputs logits.

  The convolutions and the hidden Dense have no bias: the batch norm right after
  them has its own offset, so a bias would be a redundant parameter.
  """
  import keras  # pylint: disable=g-import-not-at-top
  from keras import layers  # pylint: disable=g-import-not-at-top

  def conv_bn_relu(x, filters, name):
    x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv")(x)
    x = layers.BatchNormalization(name=f"{name}_bn")(x)
    return layers.ReLU(name=f"{name}_relu")(x)

  inputs = keras.Input((28, 28, 1), name=_INPUT_NAME)
  x = conv_bn_relu(inputs, 32, "block1a")
  x = conv_bn_relu(x, 32, "block1b")
  x = layers.MaxPooling2D(name="pool1")(x)  # 14x14
  x = conv_bn_relu(x, 64, "block2a")
  x = conv_bn_relu(x, 64, "block2b")
  x = layers.MaxPooling2D(name="pool2")(x)  # 7x7
  x = conv_bn_relu(x, 128, "block3")
  x = layers.MaxPooling2D(name="pool3")(x)  # 3x3
  x = layers.Flatten(name="flatten")(x)
  x = layers.Dense(128, use_bias=False, name="fc1")(x)
  x = layers.BatchNormalization(name="fc1_bn")(x)
  x = layers.ReLU(name="fc1_relu")(x)
  x = layers.Dropout(0.3, name="dropout")(x)
  outputs = layers.Dense(_NUM_CLASSES, name=_OUTPUT_NAME)(x)
  return keras.Model(inputs, outputs, name="fmnist_vgg_bn")


def build_resnet():
  """A ResNet for 28x28 images: a 3x3 stem of 16, three stages of two basic blocks
  (16, 32 and 64 channels at 28, 14 and 7 pixels; the first block of the second
  and third stage strides by 2 with a 1x1 projection shortcut), global average
  pooling, Dense10; ~175k float32 weights. Convolutions have no bias (batch norm
  follows each)."""
  import keras  # pylint: disable=g-import-not-at-top
  from keras import layers  # pylint: disable=g-import-not-at-top

  def conv_bn(x, filters, name, stride=1, kernel=3):
    x = layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False,
                      name=f"{name}_conv")(x)
    return layers.BatchNormalization(name=f"{name}_bn")(x)

  def block(x, filters, name, stride=1):
    shortcut = x
    if stride != 1 or x.shape[-1] != filters:
      shortcut = conv_bn(x, filters, f"{name}_proj", stride, kernel=1)
    y = layers.ReLU(name=f"{name}_relu1")(conv_bn(x, filters, f"{name}_1", stride))
    y = conv_bn(y, filters, f"{name}_2")
    return layers.ReLU(name=f"{name}_out")(layers.Add(name=f"{name}_add")([shortcut, y]))

  inputs = keras.Input((28, 28, 1), name=_INPUT_NAME)
  x = layers.ReLU(name="stem_relu")(conv_bn(inputs, 16, "stem"))
  for stage, filters in enumerate((16, 32, 64)):
    for b in range(2):
      x = block(x, filters, f"stage{stage + 1}_block{b + 1}", 2 if stage and not b else 1)
  x = layers.GlobalAveragePooling2D(name="pool")(x)
  outputs = layers.Dense(_NUM_CLASSES, name=_OUTPUT_NAME)(x)
  return keras.Model(inputs, outputs, name="fmnist_resnet_bn")


@dataclasses.dataclass(frozen=True)
class Arch:
  """One built-in model: its builder, file names and where it is kept."""
  name: str            # file stem and Keras model name
  build: object
  out_dir: str         # under models/
  description: str     # the layers, for its README


ARCHS = {
    "vgg": Arch("fmnist_vgg_bn", build_model, "default",
                "A small VGG-style CNN with batch norm for Fashion-MNIST, the sample input of\n"
                "`//tools:prune`: conv32-BN-ReLU x2, maxpool, conv64-BN-ReLU x2, maxpool,\n"
                "conv128-BN-ReLU, maxpool, Flatten, Dense128-BN-ReLU, Dropout, Dense10."),
    "resnet": Arch("fmnist_resnet_bn", build_resnet, "resnet",
                   "A small ResNet with batch norm for Fashion-MNIST, the second built-in model\n"
                   "(for --mode=layer and the pruning-method experiment): conv16-BN-ReLU, three\n"
                   "stages of two basic blocks (conv3x3-BN-ReLU-conv3x3-BN added to the\n"
                   "shortcut, ReLU) at 16, 32 and 64 channels, the second and third stage\n"
                   "starting with a stride-2 block with a 1x1 conv-BN projection shortcut;\n"
                   "global average pooling, Dense10."),
}


# --- Export and verification -----------------------------------------------------------


def _image_spec():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf.TensorSpec([None, 28, 28, 1], tf.float32, name=_INPUT_NAME)


def export_frozen_graph(model, path):
  """Writes a frozen GraphDef with input 'images:0' and output 'logits:0'."""
  from graph_prune.adapters import tf_model  # pylint: disable=g-import-not-at-top
  graph_def, _, _ = tf_model.freeze(model, [28, 28, 1], _INPUT_NAME, _OUTPUT_NAME)
  # deterministic=True sorts map fields (node attrs), so equal graphs give equal bytes.
  files.write_atomic(path, graph_def.SerializeToString(deterministic=True))
  return len(graph_def.node)


def export_saved_model(model, path):
  """Writes a SavedModel whose serving_default signature maps 'images' to 'logits'."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  class Serving(tf.Module):

    def __init__(self, model):
      super().__init__()
      self.model = model  # Tracked, so its variables are saved.

    @tf.function(input_signature=[_image_spec()])
    def serve(self, images):
      return {_OUTPUT_NAME: self.model(images, training=False)}

  module = Serving(model)
  tf.saved_model.save(module, path, signatures={"serving_default": module.serve})


def _batched(fn, x):
  import numpy as np  # pylint: disable=g-import-not-at-top
  return np.concatenate([fn(x[i:i + _EVAL_BATCH]) for i in range(0, len(x), _EVAL_BATCH)])


def frozen_graph_logits(path, x):
  """Runs the .pb as a TF1 graph in its own tf.Graph and Session, as a consumer would."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  graph_def = tf.compat.v1.GraphDef()
  with open(path, "rb") as f:
    graph_def.ParseFromString(f.read())
  graph = tf.Graph()
  with graph.as_default():
    tf.compat.v1.import_graph_def(graph_def, name="")
  with tf.compat.v1.Session(graph=graph) as sess:
    return _batched(
        lambda b: sess.run(f"{_OUTPUT_NAME}:0", feed_dict={f"{_INPUT_NAME}:0": b}), x)


def saved_model_logits(path, x):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  serve = tf.saved_model.load(path).signatures["serving_default"]
  return _batched(lambda b: serve(**{_INPUT_NAME: tf.constant(b)})[_OUTPUT_NAME].numpy(), x)


def _accuracy(logits, labels):
  return float((logits.argmax(axis=1) == labels).mean())


# --- Training ------------------------------------------------------------------------


def training_stream(x, y, batch_size: int, seed: int, augment: augment_lib.Augment):
  """Endless (images, labels) batches for fit(): every image once per pass, the
  order reshuffled each pass, each batch augmented (augment_lib.apply) with a
  seed of its own, so that the same image is flipped and shifted anew each
  epoch."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  batches = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(
      len(x), seed=seed).batch(batch_size).repeat()
  seeds = tf.data.Dataset.random(seed=seed).batch(2)
  return tf.data.Dataset.zip((batches, seeds)).map(
      lambda xy, s: (augment_lib.apply(augment, xy[0], s)[0], xy[1]),
      num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def train(data_dir, out_dir, epochs=3, batch_size=128, learning_rate=3e-3, seed=0,
          deterministic=False, min_accuracy=0.92, arch="vgg",
          augment: augment_lib.Augment = augment_lib.Augment()):
  """Trains, exports to a staging directory, verifies, then moves the files to out_dir.
  `augment`: flips and shifts of the training images (recover/augment.py; a new
  random draw every batch of every epoch), none by default. Mixup is refused: the
  loss here takes one hard label per image.

  Returns the metrics dict that is also written to metrics.json.
  """
  if augment.mixup:
    raise errors.UsageError("--augment: mixup needs soft labels; give flip and shift=N only")
  # Imported here so that --help and flag errors do not pay for importing TensorFlow.
  import keras  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  x_train, y_train = idx.load_split(data_dir, "train")
  x_test, y_test = idx.load_split(data_dir, "test")
  logging.info("Fashion-MNIST from %s: %d train, %d test images", data_dir, len(x_train),
               len(x_test))

  # Seeds Python, numpy and TensorFlow: weight init, fit()'s shuffling and dropout.
  keras.utils.set_random_seed(seed)
  if deterministic:
    tf.config.experimental.enable_op_determinism()

  spec = ARCHS[arch]
  model = spec.build()
  num_weights = model.count_params()
  logging.info("Model %s: %d parameters (%.2f MB float32)", model.name, num_weights,
               num_weights * 4 / 1e6)

  steps_per_epoch = -(-len(x_train) // batch_size)
  total_steps = epochs * steps_per_epoch
  # A short warm-up keeps the first large steps from upsetting the fresh batch-norm
  # statistics; cosine decay to 0 then settles the weights within the few epochs we have.
  warmup_steps = min(steps_per_epoch // 4, total_steps // 2)
  schedule = keras.optimizers.schedules.CosineDecay(
      initial_learning_rate=0.0, decay_steps=total_steps - warmup_steps, alpha=0.0,
      warmup_target=learning_rate, warmup_steps=warmup_steps)
  model.compile(optimizer=keras.optimizers.Adam(schedule),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                metrics=["accuracy"])

  epoch_start = [0.0]
  log_epochs = keras.callbacks.LambdaCallback(
      on_epoch_begin=lambda epoch, logs: epoch_start.__setitem__(0, time.monotonic()),
      on_epoch_end=lambda epoch, logs: logging.info(
          "epoch %d/%d: loss %.4f, train accuracy %.4f, %.0f s", epoch + 1, epochs,
          logs["loss"], logs["accuracy"], time.monotonic() - epoch_start[0]))
  wall0, cpu0 = time.monotonic(), time.process_time()
  if augment.on:
    stream = training_stream(x_train, y_train, batch_size, seed, augment)
    model.fit(stream, epochs=epochs, steps_per_epoch=steps_per_epoch, shuffle=False, verbose=0,
              callbacks=[log_epochs])
  else:
    model.fit(x_train, y_train, batch_size=batch_size, epochs=epochs, shuffle=True, verbose=0,
              callbacks=[log_epochs])
  train_seconds = time.monotonic() - wall0
  train_cpu_seconds = time.process_time() - cpu0
  logging.info("Training took %.0f s wall, %.0f s CPU", train_seconds, train_cpu_seconds)

  keras_logits = model.predict(x_test, batch_size=_EVAL_BATCH, verbose=0)
  accuracy = _accuracy(keras_logits, y_test)
  logging.info("Keras model test accuracy: %.4f", accuracy)
  if accuracy < min_accuracy:
    raise errors.GraphPruneError(f"test accuracy {accuracy:.4f} is below --min_accuracy "
                                 f"{min_accuracy}; nothing written")

  out_dir = os.path.abspath(out_dir)
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  # Staged next to out_dir (same file system, so the final moves are renames) and not
  # inside it, so that models:default's glob never sees half-written files.
  stage = tempfile.mkdtemp(prefix=".train_default-", dir=parent)
  try:
    pb_name, sm_name = f"{spec.name}.pb", f"{spec.name}_savedmodel"
    pb_path = os.path.join(stage, pb_name)
    sm_path = os.path.join(stage, sm_name)
    # A compiled model also tracks its optimizer, and the SavedModel would carry Adam's
    # two slot variables per weight (3x the size); export a never-compiled copy instead
    # (not keras.models.clone_model, which compiles the clone like the original).
    inference_model = spec.build()
    inference_model.set_weights(model.get_weights())
    num_nodes = export_frozen_graph(inference_model, pb_path)
    export_saved_model(inference_model, sm_path)
    logging.info("Exported %s (%d nodes) and %s", pb_name, num_nodes, sm_name)

    # Each export must classify the test set exactly as the Keras model does.
    results = {"keras": accuracy}
    for what, logits in (("frozen_graph", frozen_graph_logits(pb_path, x_test)),
                         ("saved_model", saved_model_logits(sm_path, x_test))):
      results[what] = _accuracy(logits, y_test)
      max_diff = float(np.abs(logits - keras_logits).max())
      logging.info("%s test accuracy: %.4f (max |logit - Keras logit| = %.2g)", what,
                   results[what], max_diff)
      if results[what] != accuracy or max_diff > 1e-3:
        raise RuntimeError(f"{what} does not reproduce the Keras model: accuracy "
                           f"{results[what]:.4f} vs {accuracy:.4f}, max logit diff {max_diff:.2g}")

    metrics = {
        "model": spec.name,
        "arch": arch,
        "dataset": "fashion-mnist",
        "test_images": len(x_test),
        "test_accuracy": accuracy,
        "test_accuracy_frozen_graph": results["frozen_graph"],
        "test_accuracy_saved_model": results["saved_model"],
        "parameters": num_weights,
        "epochs": epochs,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "augment": augment.to_json() if augment.on else None,
        "seed": seed,
        "deterministic_ops": deterministic,
        "train_seconds": round(train_seconds, 1),
        "train_cpu_seconds": round(train_cpu_seconds, 1),
    }
    files.write_json(os.path.join(stage, "metrics.json"), metrics, indent=2)
    files.write_text(os.path.join(stage, "README.md"), _readme(metrics, spec))

    os.makedirs(out_dir, exist_ok=True)
    for name in sorted(os.listdir(stage)):
      dest = os.path.join(out_dir, name)
      if os.path.isdir(dest):
        shutil.rmtree(dest)
      os.replace(os.path.join(stage, name), dest)
  finally:
    shutil.rmtree(stage, ignore_errors=True)
  logging.info("Wrote %s", out_dir)
  return metrics


def _readme(m, spec):
  flags_used = (f"--epochs={m['epochs']} --batch_size={m['batch_size']} "
                f"--learning_rate={m['learning_rate']} --seed={m['seed']}")
  if m["arch"] != "vgg":
    flags_used = f"--arch={m['arch']} " + flags_used
  if m.get("augment"):
    flags_used += " --augment=" + augment_lib.Augment(**m["augment"]).flag_value()
  if m["deterministic_ops"]:
    flags_used += " --deterministic"
  pb_name, sm_name = f"{spec.name}.pb", f"{spec.name}_savedmodel"
  title = "Default model" if spec.out_dir == "default" else "Built-in model"
  return f"""# {title}: {spec.name}

{spec.description}
{m['parameters']:,} float32 parameters.

Input: `images`, float32 `[N, 28, 28, 1]`, pixels scaled to [0, 1].
Output: `logits`, float32 `[N, 10]` (no softmax).

- `{pb_name}`: frozen GraphDef, tensors `{_INPUT_NAME}:0` -> `{_OUTPUT_NAME}:0`.
- `{sm_name}/`: SavedModel, signature `serving_default`,
  input `{_INPUT_NAME}`, output `{_OUTPUT_NAME}`.

Test accuracy (10,000 test images): **{m['test_accuracy']:.4f}**, the same for the
Keras model, the frozen graph and the SavedModel.
Training: {m['epochs']} epochs, {m['train_seconds']:.0f} s wall time
({m['train_cpu_seconds']:.0f} s CPU time) on 2 CPU cores.

Reproduce (from the workspace root, after `source third_party/bootstrap.sh`):

    bazel run //tools:train_default -- {flags_used}

or without Bazel: `PYTHONPATH=. .venv/bin/python tools/train_default.py {flags_used}`.
"""
