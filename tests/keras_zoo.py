"""Keras application models used as test fixtures for graph_prune.

Every model is built with ``weights=None`` (no downloads), a 10-class top and
the smallest sensible square input, then given random but deterministic,
non-trivial weights and frozen into a ``tf.compat.v1.GraphDef``.

Input sizes: Keras accepts 32x32 for every architecture here except
InceptionV3 (at least 75) and Xception (at least 71); NASNetMobile has no
224 or multiple-of-32 requirement when ``weights=None``.  64 is used where
allowed so that the deepest stages still have spatial extent larger than 1x1
(at 32 many nets reach 1x1 and a spatial slicing bug would go unnoticed).
"""

import os
import tempfile
import zipfile

import numpy as np
import keras
import tensorflow as tf

from graph_prune.adapters import tf_model

NUM_CLASSES = 10

ARCHITECTURES = {
    "VGG16": (keras.applications.VGG16, 64),
    "ResNet50": (keras.applications.ResNet50, 64),
    "ResNet50V2": (keras.applications.ResNet50V2, 64),
    "MobileNet": (keras.applications.MobileNet, 64),
    "MobileNetV2": (keras.applications.MobileNetV2, 64),
    "MobileNetV3Small": (keras.applications.MobileNetV3Small, 64),
    "DenseNet121": (keras.applications.DenseNet121, 64),
    "InceptionV3": (keras.applications.InceptionV3, 75),
    "Xception": (keras.applications.Xception, 71),
    "EfficientNetB0": (keras.applications.EfficientNetB0, 64),
    "EfficientNetV2B0": (keras.applications.EfficientNetV2B0, 64),
    "ConvNeXtTiny": (keras.applications.ConvNeXtTiny, 64),
    "NASNetMobile": (keras.applications.NASNetMobile, 64),
}

# These architectures contain their own Rescaling/Normalization layers and so
# expect raw pixels in [0, 255]; the others expect already-preprocessed
# inputs, for which [-1, 1] is the representative range.
_RAW_PIXEL_INPUT = frozenset(
    {"MobileNetV3Small", "EfficientNetB0", "EfficientNetV2B0", "ConvNeXtTiny"}
)

# Standard deviation of the classifier's pre-softmax logits (across classes)
# on random inputs.  Around 1.5 the softmax is clearly neither uniform nor
# one-hot, so a wrong output is visible in the probabilities.
_TARGET_LOGIT_STD = 1.5

PLANTED_INPUT_SIZE = 32

# Conv layer name -> output channels that are exactly zero after the ReLU.
PLANTED_DEAD_CHANNELS = {"conv1": [1, 4, 5], "conv2": [0, 7]}


def input_size(name):
    """Return the square input size for architecture ``name`` or ``"planted"``."""
    if name == "planted":
        return PLANTED_INPUT_SIZE
    return ARCHITECTURES[name][1]


def sample_input(name, batch=2, seed=0, size=None):
    """Return a float32 NHWC batch in the value range ``name`` expects.

    Architectures with built-in preprocessing get raw pixels in [0, 255],
    all others get values in [-1, 1]. ``size`` overrides ``input_size(name)``.
    """
    size = size or input_size(name)
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1.0, 1.0, size=(batch, size, size, 3))
    if name in _RAW_PIXEL_INPUT:
        x = (x + 1.0) * 127.5
    return x.astype(np.float32)


def all_layers(model):
    """Return every leaf layer of ``model`` in a deterministic order.

    ConvNeXt nests ``Sequential`` sub-models (stem and downsampling blocks),
    whose weights would otherwise be missed.
    """
    leaves = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            leaves.extend(all_layers(layer))
        else:
            leaves.append(layer)
    return leaves


def _he_normal(rng, shape, fan_in):
    """He-normal sample: keeps activation variance roughly constant per layer.

    Keras' default glorot init roughly halves the signal variance at every
    ReLU; through VGG16 (no batch norm) that leaves the logits dominated by
    the biases, i.e. nearly independent of the input.
    """
    return rng.normal(0.0, np.sqrt(2.0 / fan_in), size=shape)


def _random_bias(rng, shape):
    """Non-zero bias so that BiasAdd/Add nodes are not folded away."""
    return rng.normal(0.0, 0.2, size=shape)


def _randomise_layer(layer, rng):
    """Overwrite every weight of ``layer`` with a seeded random value.

    Raises ``ValueError`` for a weight it does not know, so that a new
    architecture cannot silently keep Keras' trivial initial values.
    """
    new_values = []
    for var in layer.weights:
        shape = tuple(var.shape)
        kind = type(layer).__name__
        wname = var.name
        if wname == "bias":
            value = _random_bias(rng, shape)
        elif kind in ("Conv2D", "Dense") and wname == "kernel":
            # Covers grouped convs too: shape[-2] is already in_channels/groups.
            value = _he_normal(rng, shape, int(np.prod(shape[:-1])))
        elif kind == "SeparableConv2D" and wname == "pointwise_kernel":
            value = _he_normal(rng, shape, int(np.prod(shape[:-1])))
        elif (kind == "DepthwiseConv2D" and wname == "kernel") or (
            kind == "SeparableConv2D" and wname == "depthwise_kernel"
        ):
            # Each output channel only sees its own kh x kw window.
            value = _he_normal(rng, shape, int(np.prod(shape[:2])))
        elif kind in ("BatchNormalization", "LayerNormalization") and wname == "gamma":
            value = rng.uniform(0.5, 1.5, size=shape)
        elif kind in ("BatchNormalization", "LayerNormalization") and wname == "beta":
            value = rng.normal(0.0, 0.2, size=shape)
        elif kind == "BatchNormalization" and wname == "moving_mean":
            # build() overwrites this in _calibrate_batch_norm; the planted
            # model keeps it.
            value = rng.normal(0.0, 0.2, size=shape)
        elif kind == "BatchNormalization" and wname == "moving_variance":
            value = rng.uniform(0.5, 1.5, size=shape)
        elif kind == "LayerScale":
            # ConvNeXt initialises layer scale to 1e-6, which makes every
            # residual branch numerically invisible.
            value = rng.uniform(0.5, 1.5, size=shape)
        elif kind == "Normalization" and wname == "mean":
            # EfficientNetB0's input normalisation, applied after x / 255.
            value = rng.uniform(0.3, 0.6, size=shape)
        elif kind == "Normalization" and wname == "variance":
            value = rng.uniform(0.04, 0.09, size=shape)
        elif kind == "Normalization" and wname == "count":
            value = var.numpy()
        else:
            raise ValueError(
                f"do not know how to randomise {kind} {layer.name}/{wname}"
            )
        new_values.append(np.asarray(value, dtype=var.dtype))
    if new_values:
        layer.set_weights(new_values)
    if isinstance(layer, keras.layers.Normalization):
        # Normalization.call uses tensors snapshotted from its weights at
        # build time; without this the new mean/variance are ignored.
        layer.finalize_state()


def _calibrate_batch_norm(model, layers, x, rng):
    """Set every BN's moving statistics from one forward pass, plus noise.

    In inference mode batch norm does not normalise anything, so with
    arbitrary moving statistics the activations of a 50-200 layer network
    drift by orders of magnitude.  One training-mode pass with momentum 0
    makes each moving mean/variance equal to the statistics its input really
    has (for the random kernels above), layer after layer.

    The variance is then widened by 0.3 * mean**2.  Late channels of a random
    net fed with noise images are nearly constant across samples; normalising
    their tiny spread to unit variance makes swish / hard-swish / squeeze-
    excite nets amplify per-sample differences layer after layer until some
    inputs give a one-hot softmax (seen in EfficientNet*, MobileNetV3Small).
    The multiplicative and additive noise keeps the folded scale/offset
    generic.
    """
    bns = [ly for ly in layers if isinstance(ly, keras.layers.BatchNormalization)]
    if not bns:
        return
    dropouts = [ly for ly in layers if isinstance(ly, keras.layers.Dropout)]
    saved_momentum = [bn.momentum for bn in bns]
    saved_rate = [d.rate for d in dropouts]
    try:
        for bn in bns:
            bn.momentum = 0.0
        # Dropout is active in training mode and would bias the statistics.
        for d in dropouts:
            d.rate = 0.0
        model(x, training=True)
    finally:
        for bn, momentum in zip(bns, saved_momentum):
            bn.momentum = momentum
        for d, rate in zip(dropouts, saved_rate):
            d.rate = rate
    for bn in bns:
        mean = bn.moving_mean.numpy().astype(np.float64)
        var = bn.moving_variance.numpy().astype(np.float64)
        std = np.sqrt(var + bn.epsilon)
        var = (var + 0.3 * mean**2) * rng.uniform(0.75, 1.33, size=var.shape)
        mean = mean + 0.1 * std * rng.standard_normal(mean.shape)
        bn.moving_mean.assign(mean.astype(np.float32))
        bn.moving_variance.assign(var.astype(np.float32))


def _calibrate_logits(model, layers, x):
    """Rescale the classifier so its logits have ``_TARGET_LOGIT_STD``.

    The logits are recovered from the softmax output as log(p) (a per-sample
    shift does not change their spread across classes).  The classifier is
    the last layer with a kernel (a Dense, or a 1x1 Conv2D in MobileNet and
    MobileNetV3); nothing after it except reshapes and the softmax, so
    scaling its kernel and bias scales the logits exactly.
    """
    head = [ly for ly in layers if any(w.name == "kernel" for w in ly.weights)][-1]
    for _ in range(10):
        probs = np.asarray(model(x, training=False), dtype=np.float64)
        saturated = probs.min() < 1e-30
        if saturated:
            # log(p) is unreliable: shrink hard and look again.
            factor = 0.1
        else:
            factor = _TARGET_LOGIT_STD / np.log(probs).std(axis=1).mean()
        head.set_weights([w * np.float32(factor) for w in head.get_weights()])
        if not saturated:
            # The logits are linear in the head's weights: no need to re-check.
            return
    raise RuntimeError(f"could not de-saturate the softmax of {model.name}")


def build(name, seed=0, size=None):
    """Build architecture ``name`` with seeded random, non-trivial weights.

    ``weights=None`` models have zero biases and identity batch norm, which
    grappler folds away and which hides channel-slicing bugs, so every
    kernel, bias, BN/LN parameter, layer-scale and input-normalisation
    weight is redrawn from ``numpy.random.default_rng(seed)``.  BN moving
    statistics are calibrated (see ``_calibrate_batch_norm``) and the
    classifier rescaled so the softmax output is informative.  The final
    softmax stays in the model, as Keras builds it.

    ``size`` overrides the architecture's test input size (benchmarks use
    224, the size the published architectures were designed for).

    The Keras session is cleared first so that auto-generated layer names,
    and hence node names in the frozen graph, are identical on every call.
    """
    constructor, test_size = ARCHITECTURES[name]
    size = size or test_size
    keras.backend.clear_session()
    model = constructor(
        weights=None,
        include_top=True,
        classes=NUM_CLASSES,
        input_shape=(size, size, 3),
    )
    rng = np.random.default_rng(seed)
    layers = all_layers(model)
    for layer in layers:
        _randomise_layer(layer, rng)
    # Calibrate on a batch that tests are unlikely to reuse verbatim; 32
    # samples because the last stages are only 2x2 (or 1x1) spatially and
    # the statistics of 8 samples there are too noisy.
    x = sample_input(name, batch=32, seed=seed + 1_000_003, size=size)
    _calibrate_batch_norm(model, layers, x, rng)
    _calibrate_logits(model, layers, x)
    return model


def freeze(model):
    """Freeze ``model`` into a GraphDef with a batch dimension of None.

    Returns ``(graph_def, input_tensor_name, output_tensor_name)``; the
    placeholder is named ``input`` (tensor ``input:0``) and the output is the
    softmax, exposed as ``Identity:0``.

    ConvNeXt's depthwise layers are grouped ``Conv2D``s, which Keras wraps in
    an XLA-compiled ``tf.function``; they stay ``StatefulPartitionedCall``
    nodes with a function in ``graph_def.library``.
    """
    return tf_model.freeze(model, list(model.inputs[0].shape[1:]))


class _Serving(tf.Module):
    """tf.Module wrapper giving the SavedModel fixed signature names.

    ``model.export`` names the input after the Keras input layer, which is
    auto-numbered (``input_layer_7``) and so changes between builds.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model
        spec = tf.TensorSpec(
            [None] + list(model.inputs[0].shape[1:]), tf.float32, name="input"
        )
        self.serve = tf.function(self._serve, input_signature=[spec])

    def _serve(self, images):
        """Return the softmax output under the signature key ``output``."""
        return {"output": self.model(images, training=False)}


def save_saved_model(model, path):
    """Save ``model`` as a SavedModel with a ``serving_default`` signature.

    The signature takes one float32 tensor ``input`` of shape
    ``[None, H, W, C]`` and returns a dict with one tensor ``output`` (the
    softmax probabilities).  Returns ``path``.
    """
    module = _Serving(model)
    tf.saved_model.save(
        module, path, signatures={"serving_default": module.serve}
    )
    return path


def write_fixture(name, pb_path, sm_zip_path):
    """Build architecture ``name`` once; write its frozen GraphDef and zipped SavedModel."""
    model = build(name)
    graph_def, _, _ = freeze(model)
    with open(pb_path, "wb") as f:
        f.write(graph_def.SerializeToString())
    with tempfile.TemporaryDirectory() as tmp:
        sm = save_saved_model(model, os.path.join(tmp, "sm"))
        with zipfile.ZipFile(sm_zip_path, "w", zipfile.ZIP_STORED) as z:
            for root, _, files in os.walk(sm):
                for fname in sorted(files):
                    full = os.path.join(root, fname)
                    z.write(full, os.path.relpath(full, sm))


class Fixture:
    """Architecture ``name``'s frozen GraphDef (``pb``) and SavedModel (``saved_model``).

    Under Bazel both come from the ``//tests:fixture_<name>`` genrule, built once
    for every test that lists it in ``data`` and cached between runs; run
    outside Bazel (``python tests/x_test.py``) the fixture is built here.
    """

    def __init__(self, name, tmp):
        built = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
        pb, sm_zip = (os.path.join(built, f"{name}.pb"), os.path.join(built, f"{name}_sm.zip"))
        if not (os.path.exists(pb) and os.path.exists(sm_zip)):
            pb, sm_zip = os.path.join(tmp, f"{name}.pb"), os.path.join(tmp, f"{name}_sm.zip")
            write_fixture(name, pb, sm_zip)
        self.pb = pb
        self._sm_zip = sm_zip
        self._sm_dir = os.path.join(tmp, f"{name}_sm")

    @property
    def saved_model(self):
        """The SavedModel directory, unpacked into the test's tmp on first use."""
        if not os.path.isdir(self._sm_dir):
            with zipfile.ZipFile(self._sm_zip) as z:
                z.extractall(self._sm_dir)
        return self._sm_dir

    def graph_def(self):
        gd = tf.compat.v1.GraphDef()
        with open(self.pb, "rb") as f:
            gd.ParseFromString(f.read())
        return gd


def make_planted_model(seed, head="gap"):
    """Small VGG-style model with known, exactly-dead conv output channels.

    Layers: conv1(8)+bn1+relu1, conv2(16)+bn2+relu2, pool, conv3(16)+bn3+
    relu3, then GlobalAveragePooling2D (``head="gap"``) or Flatten
    (``head="flatten"``), fc1 Dense(32, relu), fc2 Dense(10, softmax).

    For each dead channel the kernel slice, conv bias, BN beta and BN
    moving mean are zero, so BN gives gamma * 0 / sqrt(var + eps) + 0 = 0
    and the channel is exactly 0.0 after the ReLU for every input, both in
    Keras and after BN folding.  All other weights are seeded random values,
    BN statistics and fc2 are calibrated as in ``build`` (so no other channel
    is constantly zero).

    Returns ``(model, {layer_name: [dead channel indices]})``.
    """
    if head not in ("gap", "flatten"):
        raise ValueError(f"head must be 'gap' or 'flatten', got {head!r}")
    keras.backend.clear_session()
    s = PLANTED_INPUT_SIZE
    inputs = keras.Input((s, s, 3), name="input")
    x = inputs
    for i, filters in enumerate((8, 16, 16), start=1):
        x = keras.layers.Conv2D(filters, 3, padding="same", name=f"conv{i}")(x)
        x = keras.layers.BatchNormalization(name=f"bn{i}")(x)
        x = keras.layers.ReLU(name=f"relu{i}")(x)
        if i == 2:
            x = keras.layers.MaxPooling2D(2, name="pool")(x)
    if head == "gap":
        x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    else:
        x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(32, activation="relu", name="fc1")(x)
    outputs = keras.layers.Dense(NUM_CLASSES, activation="softmax", name="fc2")(x)
    model = keras.Model(inputs, outputs, name="planted")

    rng = np.random.default_rng(seed)
    layers = all_layers(model)
    for layer in layers:
        _randomise_layer(layer, rng)
    dead = {k: list(v) for k, v in PLANTED_DEAD_CHANNELS.items()}
    bn_of = {name: model.get_layer("bn" + name[len("conv"):]) for name in dead}
    for conv_name, channels in dead.items():
        conv = model.get_layer(conv_name)
        kernel, bias = conv.get_weights()
        kernel[..., channels] = 0.0
        bias[channels] = 0.0
        conv.set_weights([kernel, bias])
        # beta before calibrating, so later layers are calibrated on the
        # zeros they will actually see.
        gamma, beta, mean, var = bn_of[conv_name].get_weights()
        beta[channels] = 0.0
        bn_of[conv_name].set_weights([gamma, beta, mean, var])
    # Calibrated statistics, as in build(): with arbitrary ones some live
    # conv3 channels came out negative everywhere, i.e. accidentally dead.
    x = sample_input("planted", batch=32, seed=seed + 1_000_003)
    _calibrate_batch_norm(model, layers, x, rng)
    for conv_name, channels in dead.items():
        gamma, beta, mean, var = bn_of[conv_name].get_weights()
        mean[channels] = 0.0
        # Calibration measured a variance of 0 for these channels; keep the
        # folded BN scale ordinary.
        var[channels] = rng.uniform(0.5, 1.5, size=len(channels))
        bn_of[conv_name].set_weights([gamma, beta, mean, var])
    # Only fc2 is rescaled, which cannot revive a dead channel.
    _calibrate_logits(model, layers, x)
    return model, dead
