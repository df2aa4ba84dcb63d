"""Speed and memory of analysis + plan + rewrite, without TensorFlow import or model load.

  bazel run //benchmarks:prune_speed -- [--models=ResNet50,VGG16] [--size=224]
      [--chain=250,500,1000,2000] [--repeats=3] [--json=out.json]

For each Keras application (weights=None, randomised batch-norm statistics so
that grappler keeps every channel op) the model is frozen, loaded and
normalised first; then the timed stage runs: channel analysis, l1 scoring,
allocation at ratio 0.5, slicing and writing the edits into a new GraphDef.
Peak memory is the kernel's resident-set high-water mark, reset after loading
(/proc/self/clear_refs), above the resident set at that moment. A synthetic
chain of N convolutions shows how the stage time grows with graph size.
"""

import ctypes
import gc
import json
import os
import re
import time

from absl import app
from absl import flags
from absl import logging
import numpy as np

_MODELS = flags.DEFINE_list("models", ["ResNet50", "VGG16"], "keras.applications names.")
_SIZE = flags.DEFINE_integer("size", 224, "Input height and width.")
_CHAIN = flags.DEFINE_list("chain", ["250", "500", "1000", "2000"], "Synthetic chain lengths.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repetitions; the median is reported.")
_JSON = flags.DEFINE_string("json", None, "Also write the figures as JSON here.")


def _status_kib(field):
  with open("/proc/self/status") as f:
    match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
  return int(match.group(1))


def _reset_peak():
  """Returns freed heap to the kernel (so RSS is live memory, not what loading
  left behind), then resets VmHWM to the current RSS (Linux >= 4.0)."""
  gc.collect()
  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except OSError:
    pass
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def _stage(model, graph):
  """The timed work: analyse, score, allocate, slice, write edits into a GraphDef."""
  from graph_prune.adapters import tf_model  # pylint: disable=g-import-not-at-top
  from graph_prune.analysis import groups  # pylint: disable=g-import-not-at-top
  from graph_prune.criteria import allocation  # pylint: disable=g-import-not-at-top
  from graph_prune.criteria import importance  # pylint: disable=g-import-not-at-top
  from graph_prune.rewrite import slicing  # pylint: disable=g-import-not-at-top
  from graph_prune.ops import tf_ops  # pylint: disable=g-import-not-at-top
  analysis = groups.analyse(graph, tf_ops.REGISTRY)
  plan = allocation.allocate(analysis, importance.score(analysis, "l1"), allocation.Spec(0.5),
                             "l1")
  edits = slicing.build_edits(analysis, plan, slicing.SLICE)
  return tf_model.apply_edits(model, edits), len(analysis.groups)


def measure(model, graph, repeats):
  times, peaks, groups = [], [], 0
  for _ in range(repeats):
    can_reset = _reset_peak()
    base = _status_kib("VmRSS")
    t0 = time.perf_counter()
    out, groups = _stage(model, graph)
    times.append(time.perf_counter() - t0)
    peaks.append((_status_kib("VmHWM") - base) * 1024 if can_reset else None)
    del out
  const_bytes = sum(int(c.nbytes) for c in graph.constants.values())
  peak = None if None in peaks else int(np.median(peaks))
  return {"seconds": float(np.median(times)), "seconds_all": times, "peak_bytes": peak,
          "const_bytes": const_bytes, "peak_over_const": peak / const_bytes if peak else None,
          "nodes": len(graph.nodes), "groups": groups}


def _keras_graph(name, size):
  """Frozen Keras application with random batch-norm statistics and biases."""
  import keras  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from tensorflow.python.framework import convert_to_constants  # pylint: disable=g-import-not-at-top
  model = getattr(keras.applications, name)(weights=None, input_shape=(size, size, 3))
  rng = np.random.default_rng(0)
  for layer in model.layers:
    weights = layer.get_weights()
    if weights:
      layer.set_weights([rng.uniform(0.5, 1.5, w.shape).astype(w.dtype) if w.ndim == 1 else w
                         for w in weights])
  fn = tf.function(lambda x: model(x, training=False)).get_concrete_function(
      tf.TensorSpec([None, size, size, 3], tf.float32))
  return convert_to_constants.convert_variables_to_constants_v2(fn).graph.as_graph_def()


def _chain_graph(layers):
  """x -> (Conv2D 3x3 + BiasAdd + Relu) x layers -> Mean: every layer a group."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  with tf.Graph().as_default() as g:
    x = tf.compat.v1.placeholder(tf.float32, [None, 8, 8, 8], name="x")
    for i in range(layers):
      w = tf.constant(rng.standard_normal((3, 3, 8, 8)).astype(np.float32))
      b = tf.constant(rng.standard_normal(8).astype(np.float32))
      x = tf.nn.relu(tf.nn.bias_add(tf.nn.conv2d(x, w, 1, "SAME"), b), name=f"layer{i}")
    tf.reduce_mean(x, axis=[1, 2], name="out")
  return g.as_graph_def()


def _load(graph_def, tmp):
  from graph_prune.adapters import tf_model  # pylint: disable=g-import-not-at-top
  with open(tmp, "wb") as f:
    f.write(graph_def.SerializeToString())
  model = tf_model.normalise(tf_model.load(tmp))
  os.remove(tmp)
  return model, tf_model.to_view(model)


def main(argv):
  del argv
  import tempfile  # pylint: disable=g-import-not-at-top
  tmp = os.path.join(tempfile.mkdtemp(), "model.pb")
  results = {"models": {}, "chain": {}}
  print(f"{'model':14}{'nodes':>8}{'groups':>8}{'stage s':>10}{'const MB':>10}"
        f"{'peak MB':>10}{'peak/const':>12}")
  for name in _MODELS.value:
    logging.info("building %s at %d", name, _SIZE.value)
    model, graph = _load(_keras_graph(name, _SIZE.value), tmp)
    r = measure(model, graph, _REPEATS.value)
    results["models"][name] = r
    print(f"{name:14}{r['nodes']:>8}{r['groups']:>8}{r['seconds']:>10.3f}"
          f"{r['const_bytes'] / 1e6:>10.1f}"
          f"{(r['peak_bytes'] or 0) / 1e6:>10.1f}{(r['peak_over_const'] or 0):>12.2f}", flush=True)
  print(f"\n{'chain layers':14}{'nodes':>8}{'stage s':>10}{'ms/layer':>10}")
  for n in (int(v) for v in _CHAIN.value):
    model, graph = _load(_chain_graph(n), tmp)
    r = measure(model, graph, _REPEATS.value)
    r["ms_per_layer"] = 1000 * r["seconds"] / n
    results["chain"][n] = r
    print(f"{n:<14}{r['nodes']:>8}{r['seconds']:>10.3f}{r['ms_per_layer']:>10.3f}", flush=True)
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(results, f, indent=1, sort_keys=True)


if __name__ == "__main__":
  app.run(main)
