"""The whole command, file to file, and each of its stages: wall time and peak
resident memory above the interpreter's baseline with TensorFlow imported.

  bazel run //benchmarks:whole_command -- --models=VGG16,ResNet50 --size=224 \
      --work_dir=/tmp/whole_command [--json=out.json] [--large_gb=2.3]

Each model (a Keras application, weights=None with every bias and batch-norm
statistic randomised; tests/keras_zoo.py) is frozen once into --work_dir. Then,
per model:

- the command itself: //tools:prune --ratio=0.5 in a child process, its wall time
  and its peak resident set (the kernel's high-water mark) above a child that only
  imports TensorFlow and runs one op (the baseline);
- the stages, in another child process, one after another as the pipeline runs
  them: load, normalise, view + analyse, plan, rewrite, validate (the pruned
  model's view), verify (the oracle), write; per stage its seconds and the peak
  resident set above the baseline reached during it (the high-water mark is reset
  before each stage, /proc/self/clear_refs), and the constant bytes of the model.

With --large_gb, a model past protobuf's 2 GiB is built twice (ONNX with external
data, SavedModel with variables; 2.3 GB of files each, plus the pruned outputs) and
the whole command timed on each, wall time and peak.

Linux only (/proc/self/status).
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags

_MODELS = flags.DEFINE_list("models", ["VGG16", "ResNet50"], "keras.applications names.")
_SIZE = flags.DEFINE_integer("size", 224, "Input height and width.")
_WORK_DIR = flags.DEFINE_string("work_dir", None, "Where the frozen models are kept.")
_RATIO = flags.DEFINE_float("ratio", 0.5, "Pruning ratio.")
_JSON = flags.DEFINE_string("json", None, "Also write the figures as JSON here.")
_STAGE = flags.DEFINE_string("stage_child", None, "(internal) run the stages of this model.")
_LARGE_GB = flags.DEFINE_float(
    "large_gb", 0.0, "Also build a model with this many GB of weights (a stack of 3x3 "
    "convolutions, 2048 channels, at 4x4, random weights), as ONNX with external data and "
    "as a SavedModel with variables, and time the whole command on each; over 2.15 passes "
    "protobuf's 2 GiB limit. 0: skip.")

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _kib(field: str) -> int:
  with open("/proc/self/status", encoding="ascii") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1])
  raise KeyError(field)


def _reset_peak() -> None:
  import ctypes  # pylint: disable=g-import-not-at-top
  import gc  # pylint: disable=g-import-not-at-top
  gc.collect()
  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except OSError:
    pass
  with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
    f.write("5")


def _baseline_kib() -> int:
  """Resident set of an interpreter with TensorFlow imported and one op run."""
  script = ("import os\nos.environ['TF_CPP_MIN_LOG_LEVEL'] = '3'\nimport tensorflow as tf\n"
            "tf.constant(1.0) + 1.0\n"
            "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])")
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       check=True, env=dict(os.environ, PYTHONPATH=_ROOT))
  return int(out.stdout.strip().splitlines()[-1])


def _build(name: str, size: int, work_dir: str) -> str:
  path = os.path.join(work_dir, f"{name}_{size}.pb")
  if not os.path.exists(path):
    script = ("import sys\nfrom tests import keras_zoo\n"
              "gd, _, _ = keras_zoo.freeze(keras_zoo.build(sys.argv[1], size=int(sys.argv[2])))\n"
              "open(sys.argv[3], 'wb').write(gd.SerializeToString())\n")
    subprocess.run([sys.executable, "-c", script, name, str(size), path], check=True,
                   env=dict(os.environ, PYTHONPATH=_ROOT, TF_CPP_MIN_LOG_LEVEL="3"))
  return path


def _build_large_onnx(gb: float, work_dir: str) -> str:
  """A conv stack with `gb` GB of float32 weights, saved with external data (random
  weights, He-scaled, random biases): its path."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import onnx  # pylint: disable=g-import-not-at-top
  from onnx import helper  # pylint: disable=g-import-not-at-top
  from onnx import numpy_helper  # pylint: disable=g-import-not-at-top
  width, first = 2048, 64
  per_layer = width * width * 9 * 4
  layers = max(1, int(round((gb * 1e9 - width * first * 9 * 4) / per_layer)) + 1)
  path = os.path.join(work_dir, f"large_{layers}x{width}.onnx")
  rng = np.random.default_rng(0)
  nodes, inits, x, c = [], [], "input", first
  for i in range(layers):
    w = rng.standard_normal((width, c, 3, 3), dtype=np.float32) * np.float32((2 / (9 * c)) ** .5)
    b = rng.standard_normal(width, dtype=np.float32) * np.float32(0.1)
    inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
    nodes += [helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [f"c{i}"], pads=[1, 1, 1, 1]),
              helper.make_node("Relu", [f"c{i}"], [f"r{i}"])]
    x, c = f"r{i}", width
  head = rng.standard_normal((c, 10), dtype=np.float32) * np.float32(0.05)
  inits += [numpy_helper.from_array(head, "fc_w"),
            numpy_helper.from_array(np.full(10, 0.1, np.float32), "fc_b")]
  nodes += [helper.make_node("GlobalAveragePool", [x], ["gap"]),
            helper.make_node("Flatten", ["gap"], ["flat"]),
            helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"])]
  if not os.path.exists(path):
    graph = helper.make_graph(
        nodes, "large", [helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT,
                                                       [1, first, 4, 4])],
        [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [1, 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location=os.path.basename(path) + ".data", size_threshold=1024)
  return path


def _build_large_saved_model(onnx_path: str, work_dir: str) -> str:
  """The same network as a SavedModel with variables (NHWC), in a child process: its
  weights are the ONNX model's, read from its external data."""
  path = os.path.join(work_dir, os.path.basename(onnx_path)[:-len(".onnx")] + "_saved_model")
  if os.path.exists(path):
    return path
  script = r"""
import os, sys
import numpy as np, onnx, tensorflow as tf
from onnx import numpy_helper
m = onnx.load(sys.argv[1])
w = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
del m
layers = sum(1 for k in w if k.startswith("w"))
class Net(tf.Module):
  def __init__(self):
    self.ws = [tf.Variable(np.transpose(w.pop(f"w{i}"), (2, 3, 1, 0))) for i in range(layers)]
    self.bs = [tf.Variable(w.pop(f"b{i}")) for i in range(layers)]
    self.fc_w, self.fc_b = tf.Variable(w.pop("fc_w")), tf.Variable(w.pop("fc_b"))
  @tf.function(input_signature=[tf.TensorSpec([None, 4, 4, 64], tf.float32, name="input")])
  def serve(self, x):
    for k, b in zip(self.ws, self.bs):
      x = tf.nn.relu(tf.nn.bias_add(tf.nn.conv2d(x, k, 1, "SAME"), b))
    return {"logits": tf.matmul(tf.reduce_mean(x, [1, 2]), self.fc_w) + self.fc_b}
net = Net()
tf.saved_model.save(net, sys.argv[2], signatures={"serving_default": net.serve})
"""
  subprocess.run([sys.executable, "-c", script, onnx_path, path], check=True,
                 env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
  return path


def _command(path: str, out: str, ratio: float) -> dict:
  """//tools:prune as a user runs it, in a child that reports its own high-water
  mark at exit: wall time and peak resident set."""
  script = ("import os, runpy, sys\n"
            "sys.argv = ['prune'] + sys.argv[1:]\n"
            "try:\n  runpy.run_path(os.path.join(os.environ['GP_ROOT'], 'tools', 'prune.py'), "
            "run_name='__main__')\n"
            "except SystemExit as e:\n  code = e.code\nelse:\n  code = 0\n"
            "hwm = [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0]\n"
            "print('PEAK_KIB', hwm, 'EXIT', code, file=sys.stderr)\n")
  t0 = time.perf_counter()
  r = subprocess.run([sys.executable, "-c", script, f"--in={path}", f"--out={out}",
                      f"--ratio={ratio}", "--overwrite"], capture_output=True, text=True,
                     env=dict(os.environ, PYTHONPATH=_ROOT, GP_ROOT=_ROOT,
                              TF_CPP_MIN_LOG_LEVEL="3"), check=False)
  wall = time.perf_counter() - t0
  tail = r.stderr.rsplit("PEAK_KIB", 1)
  if len(tail) != 2 or not tail[1].split()[2] in ("0", "None"):
    raise RuntimeError(f"prune failed: {r.stderr[-800:]}")
  return {"wall_s": wall, "peak_kib": int(tail[1].split()[0])}


def _stages(path: str, ratio: float) -> dict:
  """The pipeline's stages one by one, in this process (a child of main)."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.constant(1.0) + 1.0  # pylint: disable=expression-not-assigned
  from graph_prune import formats  # pylint: disable=g-import-not-at-top
  from graph_prune import pipeline  # pylint: disable=g-import-not-at-top
  from graph_prune.analysis import groups as groups_lib  # pylint: disable=g-import-not-at-top
  from graph_prune.rewrite import slicing  # pylint: disable=g-import-not-at-top
  _reset_peak()
  base = _kib("VmRSS")
  fmt = formats.for_path(path)
  adapter, options = fmt.adapter, pipeline.Options(ratio=ratio)
  stages = []

  def stage(name, fn):
    _reset_peak()
    t0 = time.perf_counter()
    value = fn()
    seconds = time.perf_counter() - t0
    stages.append({"stage": name, "seconds": seconds,
                   "peak_above_baseline_bytes": (_kib("VmHWM") - base) * 1024,
                   "resident_after_bytes": (_kib("VmRSS") - base) * 1024})
    return value

  model = stage("load", lambda: adapter.load(path))
  model = stage("normalise", lambda: adapter.normalise(model))
  graph = stage("view", lambda: adapter.to_view(model))
  analysis = stage("analyse", lambda: groups_lib.analyse(graph, fmt.ops))
  prepared = pipeline.Prepared(fmt, model, graph, analysis)
  plan = stage("plan", lambda: pipeline.make_plan(prepared, options))
  edits = stage("rewrite", lambda: slicing.build_edits(analysis, plan, slicing.SLICE))
  pruned = stage("apply", lambda: adapter.apply_edits(model, edits))

  pruned_view = stage("validate", lambda: adapter.to_view(pruned))

  def verify():
    masked = pipeline.masked_model(adapter, model, analysis, plan)
    return pipeline.run_oracle(adapter, model, masked, pruned, graph, options,
                               set(pipeline.kept_positions(analysis, plan)), pruned_view)
  verification = stage("verify", verify)
  out_dir = tempfile.mkdtemp()
  out = os.path.join(out_dir, "out" + (".onnx" if path.endswith(".onnx") else ".pb"))
  try:
    stage("write", lambda: adapter.write(pruned, out))
  finally:
    shutil.rmtree(out_dir, ignore_errors=True)
  const_bytes = sum(int(c.nbytes) for c in graph.constants.values())
  return {"const_bytes": const_bytes, "stages": stages,
          "verify_max_rel_diff": verification.max_rel_diff}


def _measure(label: str, path: str, out: str, baseline: int, size_name: str) -> dict:
  """The whole command on one model, then its stages in a child; prints both."""
  command = _command(path, out, _RATIO.value)
  r = subprocess.run([sys.executable, os.path.abspath(__file__), f"--stage_child={path}",
                      f"--ratio={_RATIO.value}"], capture_output=True, text=True,
                     env=dict(os.environ, PYTHONPATH=_ROOT), check=False)
  if r.returncode:
    raise RuntimeError(f"stages of {label} failed: {r.stderr[-2000:]}")
  staged = json.loads(r.stdout.split("RESULT ", 1)[1])
  const = staged["const_bytes"]
  peak = (command["peak_kib"] - baseline) * 1024 if command["peak_kib"] else None
  print(f"\n{label}: {size_name} {const / 1e6:.1f} MB; whole command "
        f"{command['wall_s']:.1f} s, peak {peak / 1e6 if peak else float('nan'):.0f} MB above "
        f"the baseline ({peak / const if peak else float('nan'):.2f}x them)")
  print(f"  {'stage':10}{'s':>9}{'peak MB':>10}{'x const':>9}{'resident MB':>13}")
  for s in staged["stages"]:
    print(f"  {s['stage']:10}{s['seconds']:>9.2f}{s['peak_above_baseline_bytes'] / 1e6:>10.0f}"
          f"{s['peak_above_baseline_bytes'] / const:>9.2f}"
          f"{s['resident_after_bytes'] / 1e6:>13.0f}")
  return dict(staged, command_wall_s=command["wall_s"], command_peak_above_baseline_bytes=peak)


def main(argv):
  del argv
  if _STAGE.value:
    print("RESULT " + json.dumps(_stages(_STAGE.value, _RATIO.value)))
    return 0
  work_dir = _WORK_DIR.value or tempfile.mkdtemp()
  os.makedirs(work_dir, exist_ok=True)
  baseline = _baseline_kib()
  results = {"baseline_kib": baseline, "ratio": _RATIO.value, "models": {}}
  for name in _MODELS.value:
    path = _build(name, _SIZE.value, work_dir)
    results["models"][name] = _measure(
        f"{name} {_SIZE.value}x{_SIZE.value}", path,
        os.path.join(work_dir, f"{name}_pruned.pb"), baseline, "constants")
  if _LARGE_GB.value > 0:
    onnx_path = _build_large_onnx(_LARGE_GB.value, work_dir)
    saved_model = _build_large_saved_model(onnx_path, work_dir)
    for key, path, what, out in (
        ("large_onnx", onnx_path, "ONNX with external data", "large_pruned.onnx"),
        ("large_saved_model", saved_model, "SavedModel with variables", "large_pruned_sm")):
      results["models"][key] = _measure(f"{what} ({os.path.basename(path)})", path,
                                        os.path.join(work_dir, out), baseline, "weights")
  if _JSON.value:
    with open(_JSON.value, "w", encoding="utf-8") as f:
      json.dump(results, f, indent=1, sort_keys=True)
  return 0


if __name__ == "__main__":
  app.run(main)
