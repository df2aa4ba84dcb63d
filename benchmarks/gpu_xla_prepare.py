"""Builds, prunes and strips the models that benchmarks/gpu_xla.py times on a GPU.

  bazel run //benchmarks:gpu_xla_prepare -- --out_dir=DIR [--models=VGG16,ResNet50]
      [--size=224] [--ratios=0.5] [--round_to=1,auto] [--work_dir=DIR] [--layer_ratios=0.75]

Runs here, with TensorFlow. For each Keras application (tests/keras_zoo.py:
seeded random weights, calibrated batch-norm statistics, frozen) at --size:
tf2onnx (opset 17), then graph_prune's pipeline (l1, verified in ONNX Runtime)
at each of --ratios for every --round_to; `auto` is the GPU's multiple (8, tensor-core
tiles), as --round_to=auto chooses on a GPU.

DIR receives each graph without its large weights, so that a VGG16 (550 MB)
travels as a few kilobytes: every float initializer of at least --strip_bytes
keeps its name, dtype and shape, is marked as external data at the location
`STRIPPED`, and holds no values. onnx_jax.load refills those with seeded random
values of the right shape on the device; dense convolutions and matrix
products take the same time whatever the values. Small initializers (shape
constants, most biases) stay as they are. DIR/manifest.json records, per
model, the pruning report's figures (FLOPs, parameters, verification) and
which round_to gave which file; a round_to that yields the same graph as
another is recorded as such.
"""

import gc
import hashlib
import json
import os
import tempfile

from absl import app
from absl import flags
from absl import logging

from benchmarks import onnx_jax
from graph_prune.adapters import tf_to_onnx

_OUT_DIR = flags.DEFINE_string("out_dir", None, "Folder for the stripped graphs and manifest.json.")
_MODELS = flags.DEFINE_list("models", ["VGG16", "ResNet50"], "Keras applications (keras_zoo).")
_SIZE = flags.DEFINE_integer("size", 224, "Input height and width.")
_RATIOS = flags.DEFINE_list("ratios", ["0.5"],
                            "Fractions of channels removed from every group; the first is the "
                            "primary one.")
_CRITERION = flags.DEFINE_string("criterion", "l1", "Importance criterion.")
_ROUND_TO = flags.DEFINE_list("round_to", ["1", "auto"],
                              "Channel multiples; 'auto' is the GPU's (8, tensor-core tiles).")
_WORK_DIR = flags.DEFINE_string("work_dir", None,
                                "Keep the full-weight conversions here and reuse them "
                                "(default: a temporary folder).")
_LAYER_RATIOS = flags.DEFINE_list(
    "layer_ratios", [],
    "For each: --mode=layer at that ratio (the fraction of the removable blocks and layers "
    "removed), and uniform filter pruning to the same FLOPs at every --round_to, LayerPrune's "
    "comparison at equal FLOPs.")
_STRIP_BYTES = flags.DEFINE_integer("strip_bytes", 1024,
                                    "Float initializers of at least this size lose their values.")

def _round_to(value):
  """(multiple, label, how the report says it was chosen) for one --round_to entry."""
  if value == "auto":
    from graph_prune.bench import widths  # pylint: disable=g-import-not-at-top
    m = widths.KNOWN_MULTIPLE["gpu"]
    label = f"auto ({m}, GPU tensor-core tiles)"
    return m, label, label
  return int(value), value, ""


def _onnx_of(name, size, path):
  """keras_zoo model at size x size -> frozen GraphDef -> tf2onnx (opset 17)."""
  import keras  # pylint: disable=g-import-not-at-top
  import tf2onnx  # pylint: disable=g-import-not-at-top
  from tests import keras_zoo  # pylint: disable=g-import-not-at-top
  graph_def, inp, out = keras_zoo.freeze(keras_zoo.build(name, size=size))
  keras.backend.clear_session()  # the Keras model's weights are no longer needed
  gc.collect()
  with tf_to_onnx.collecting_garbage(tf_to_onnx.GC_INTERVAL_S):  # tf2onnx's graph copies, see there
    tf2onnx.convert.from_graph_def(graph_def, input_names=[inp], output_names=[out], opset=17,
                                   output_path=path)


def _strip_model(model, min_bytes):
  """In-place: empties the float initializers of >= min_bytes; returns values removed."""
  import onnx  # pylint: disable=g-import-not-at-top
  from onnx import numpy_helper  # pylint: disable=g-import-not-at-top
  floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE}
  removed = 0
  for t in model.graph.initializer:
    if t.data_type not in floats:
      continue
    array = numpy_helper.to_array(t)
    if array.nbytes < min_bytes:
      continue
    name, dims, dtype = t.name, list(t.dims), t.data_type
    t.Clear()
    t.name, t.data_type = name, dtype
    t.dims.extend(dims)
    t.data_location = onnx.TensorProto.EXTERNAL
    t.external_data.add(key="location", value=onnx_jax.STRIPPED)
    removed += array.size
  for node in model.graph.node:
    if node.op_type == "Constant" and any(
        a.t.data_type in floats and numpy_helper.to_array(a.t).nbytes >= min_bytes
        for a in node.attribute if a.name == "value"):
      raise ValueError(f"{node.name}: large float Constant node; only initializers are stripped")
  return removed


def _variant(doc, file, ratio, multiple, label, same, mode="filter"):
  """A manifest entry of one pruned model from its pruning report."""
  out = {"file": file, "ratio": ratio, "round_to": multiple, "label": label, "mode": mode,
         "same_model_as": same, "widths": [g["channels_after"] for g in doc["groups"]],
         "flops_before": doc["flops_before"], "flops_after": doc["flops_after"],
         "params_before": doc["params_before"], "params_after": doc["params_after"],
         "groups_pruned": doc["groups_pruned"],
         "verify_max_rel_diff": doc["verify"]["max_rel_diff"]}
  if mode == "layer":
    layers = doc["layers"]
    out.update(removed=layers["removed"], removable=layers["removable"],
               needs_recovery=layers["needs_recovery"])
  return out


def _add_file(path, base, key, first_key, files):
  """Records a pruned file unless an earlier variant made the same bytes; returns
  (that variant's key or None, the file name the manifest gives)."""
  digest = hashlib.sha256(open(path, "rb").read()).hexdigest()
  if digest in first_key:
    return first_key[digest]
  first_key[digest] = (key, base)
  files.append((path, base))
  return None, base


def prepare(out_dir, models, size, ratios, criterion, round_tos, min_bytes, work_dir=None,
            layer_ratios=()):
  """Builds, prunes and strips every model; returns the manifest (also written).

  The full-weight ONNX conversions are kept in work_dir when given (and
  reused from there), else in a temporary folder.
  """
  import onnx  # pylint: disable=g-import-not-at-top
  from graph_prune import pipeline  # pylint: disable=g-import-not-at-top
  os.makedirs(out_dir, exist_ok=True)
  manifest = {"size": size, "ratios": ratios, "criterion": criterion,
              "layer_ratios": list(layer_ratios), "models": {}}
  with tempfile.TemporaryDirectory() as tmp:
    for name in models:
      src = os.path.join(work_dir or tmp, f"{name}_{size}.onnx")
      if not os.path.exists(src):
        logging.info("%s: build and convert at %dx%d", name, size, size)
        _onnx_of(name, size, src + ".tmp")
        os.replace(src + ".tmp", src)
      entry = {"original": f"{name}.onnx", "pruned": {}}
      first_key = {}  # sha256 of a pruned file -> (the variant that made it first, its file)
      files = [(src, f"{name}.onnx")]
      for ratio in ratios:
        for value in round_tos:
          multiple, label, how = _round_to(value)
          key = f"{ratio}/{value}"
          base = f"{name}_p{round(100 * ratio)}_r{multiple}.onnx"
          out = os.path.join(tmp, base)
          logging.info("%s: prune at %s, round_to %s", name, ratio, label)
          doc = pipeline.prune(src, out, pipeline.Options(
              ratio=ratio, criterion=criterion, round_to=multiple,
              round_to_how=how))
          same, file = _add_file(out, base, key, first_key, files)
          entry["pruned"][key] = _variant(doc, file, ratio, multiple, label, same)
      for ratio in layer_ratios:
        key, base = f"layer{ratio}", f"{name}_layer{round(100 * ratio)}.onnx"
        out = os.path.join(tmp, base)
        logging.info("%s: --mode=layer at %s", name, ratio)
        doc = pipeline.prune(src, out, pipeline.Options(ratio=ratio, mode="layer"))
        same, file = _add_file(out, base, key, first_key, files)
        layer = _variant(doc, file, ratio, 1,
                         f"layer mode, {doc['layers']['removed']} of "
                         f"{doc['layers']['removable']} removed", same, mode="layer")
        entry["pruned"][key] = layer
        kept = layer["flops_after"] / layer["flops_before"]
        for value in round_tos:
          multiple, label, how = _round_to(value)
          key = f"filter_at_layer{ratio}/{value}"
          base = f"{name}_flops_of_layer{round(100 * ratio)}_r{multiple}.onnx"
          out = os.path.join(tmp, base)
          logging.info("%s: uniform filter pruning to %.4f of the FLOPs, round_to %s", name,
                       kept, label)
          doc = pipeline.prune(src, out, pipeline.Options(
              target_flops=kept, criterion=criterion, round_to=multiple,
              round_to_how=how))
          same, file = _add_file(out, base, key, first_key, files)
          entry["pruned"][key] = _variant(
              doc, file, ratio, multiple,
              f"uniform filter to the FLOPs of layer mode {ratio}, round_to {label}", same,
              mode="filter_at_layer")
      for path, base in files:
        model = onnx.load(path)
        removed = _strip_model(model, min_bytes)
        onnx.save(model, os.path.join(out_dir, base))
        logging.info("%s: %d values stripped", base, removed)
      manifest["models"][name] = entry
  with open(os.path.join(out_dir, "manifest.json"), "w") as f:
    json.dump(manifest, f, indent=1, sort_keys=True)
    f.write("\n")
  return manifest


def _path(p):
  """Paths are relative to where `bazel run` was called from."""
  if p is None or os.path.isabs(p):
    return p
  return os.path.join(os.environ.get("BUILD_WORKING_DIRECTORY", ""), p)


def main(argv):
  del argv
  manifest = prepare(_path(_OUT_DIR.value), _MODELS.value, _SIZE.value,
                     [float(r) for r in _RATIOS.value], _CRITERION.value, _ROUND_TO.value,
                     _STRIP_BYTES.value, _path(_WORK_DIR.value),
                     [float(r) for r in _LAYER_RATIOS.value])
  print(json.dumps(manifest, indent=1, sort_keys=True))


if __name__ == "__main__":
  flags.mark_flag_as_required("out_dir")  # here, so that tests can import the module
  app.run(main)
