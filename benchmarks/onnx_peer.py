"""graph_prune versus onnxsim's structured pruning, side by side, in one run.

  bazel run //benchmarks:onnx_peer -- [--models=VGG16,ResNet50,MobileNetV2] [--size=64]
      [--sparsity=0.5] [--runs=200] [--json=out.json]

For each Keras application (weights=None, randomised batch-norm statistics and
biases), converted to ONNX with tf2onnx: onnxsim.pruning.apply_structured_pruning
(model, sparsity) and graph_prune (ratio = sparsity, l1, verified) prune the same
file. Reported per tool: parameters kept, ONNX Runtime batch-1 latency (CPU
provider; medians over interleaved runs, baseline and both pruned models taken
in turn), time to prune, and whether the output was verified.

"prune s" is the same work for both tools: a loaded ModelProto in, a pruned
ModelProto out (onnxsim: its one call; graph_prune: normalise, view, analyse,
score, allocate, rewrite), best of three. "file s" is graph_prune's whole
command, file to file: loading with onnx.checker, the above, verification in
ONNX Runtime, full validation and the atomic write.
"""

import json
import os
import tempfile
import time

from absl import app
from absl import flags
import numpy as np

from graph_prune.bench import timing

_MODELS = flags.DEFINE_list("models", ["VGG16", "ResNet50", "MobileNetV2"], "Keras apps.")
_SIZE = flags.DEFINE_integer("size", 64, "Input height and width.")
_SPARSITY = flags.DEFINE_float("sparsity", 0.5, "Fraction of channels removed.")
_RUNS = flags.DEFINE_integer("runs", 200, "Timed runs per model (after 20 warm-up runs).")
_JSON = flags.DEFINE_string("json", None, "Also write the figures as JSON here.")


def _keras_onnx(name, size, path):
  """Keras application (random weights and batch-norm statistics) -> frozen GraphDef
  -> tf2onnx (opset 17)."""
  import tf2onnx  # pylint: disable=g-import-not-at-top
  from tests import keras_zoo  # pylint: disable=g-import-not-at-top
  graph_def, inp, out = keras_zoo.freeze(keras_zoo.build(name, size=size))
  tf2onnx.convert.from_graph_def(graph_def, input_names=[inp], output_names=[out], opset=17,
                                 output_path=path)


def _params(path):
  import onnx  # pylint: disable=g-import-not-at-top
  m = onnx.load(path)
  return sum(int(np.prod(t.dims)) for t in m.graph.initializer
             if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16) and t.dims)


def _latencies(paths, size, runs):
  """Median batch-1 latency (ms) per model. Runs are interleaved so drift hits all
  alike, in a fresh seeded random order each round: a fixed order measurably
  penalises whichever model runs first (a byte-identical copy of the original
  came out 1.35x "faster" when it always ran second)."""
  import onnxruntime  # pylint: disable=g-import-not-at-top
  sessions = [onnxruntime.InferenceSession(p, providers=["CPUExecutionProvider"])
              for p in paths]
  x = np.random.default_rng(0).standard_normal((1, size, size, 3)).astype(np.float32)
  names = [s.get_inputs()[0].name for s in sessions]
  calls = [lambda s=s, n=n: s.run(None, {n: x}) for s, n in zip(sessions, names)]
  # The project's one timing loop: a shuffled order within every round.
  result = timing.measure(calls, timing.Settings(warmup=20, min_runs=runs, max_runs=runs,
                                                 max_seconds=1e9, seed=1), label="onnx_peer")
  return [1000 * timing.percentile(t, 50) for t in result.times]


def _max_rel(a_path, b_path, size):
  import onnxruntime  # pylint: disable=g-import-not-at-top
  x = np.random.default_rng(5).standard_normal((4, size, size, 3)).astype(np.float32)
  outs = []
  for p in (a_path, b_path):
    s = onnxruntime.InferenceSession(p, providers=["CPUExecutionProvider"])
    outs.append(s.run(None, {s.get_inputs()[0].name: x})[0])
  return float(np.max(np.abs(outs[0] - outs[1])) / max(np.max(np.abs(outs[0])), 1e-12))


def run_model(name, tmp):
  import onnx  # pylint: disable=g-import-not-at-top
  from onnxsim import pruning  # pylint: disable=g-import-not-at-top
  from graph_prune import pipeline  # pylint: disable=g-import-not-at-top
  src = os.path.join(tmp, f"{name}.onnx")
  _keras_onnx(name, _SIZE.value, src)
  peer_path = os.path.join(tmp, f"{name}_onnxsim.onnx")
  peer_error, peer_times = None, []
  for _ in range(3):
    proto = onnx.load(src)
    t0 = time.perf_counter()
    try:
      peer = pruning.apply_structured_pruning(proto, sparsity=_SPARSITY.value)
    except Exception as e:  # pylint: disable=broad-except
      peer, peer_error = None, f"{type(e).__name__}: {e}"[:200]
    peer_times.append(time.perf_counter() - t0)
  if peer is not None:
    onnx.save(peer, peer_path)
  else:
    peer_path = src
  fmt = pipeline.format_for(src)
  options = pipeline.Options(ratio=_SPARSITY.value, criterion="l1")
  ours_times = []
  for _ in range(3):
    loaded = fmt.adapter.load(src)
    t0 = time.perf_counter()
    prepared = pipeline.prepare_model(fmt, loaded)
    pipeline.rewrite(prepared, pipeline.make_plan(prepared, options))
    ours_times.append(time.perf_counter() - t0)
  ours_path = os.path.join(tmp, f"{name}_graph_prune.onnx")
  t0 = time.perf_counter()
  doc = pipeline.prune(src, ours_path, options)
  ours_file_time = time.perf_counter() - t0
  peer_time, ours_time = min(peer_times), min(ours_times)
  control = os.path.join(tmp, f"{name}_control.onnx")
  with open(src, "rb") as f_in, open(control, "wb") as f_out:
    f_out.write(f_in.read())
  base_ms, control_ms, peer_ms, ours_ms = _latencies([src, control, peer_path, ours_path],
                                                     _SIZE.value, _RUNS.value)
  params = _params(src)
  return {
      "params": params,
      "latency_ms": base_ms,
      "control_speedup": base_ms / control_ms,   # the original against a copy of itself
      "onnxsim": {"params": _params(peer_path), "latency_ms": peer_ms,
                  "speedup": base_ms / peer_ms, "prune_s": peer_time, "error": peer_error,
                  "verified": False,
                  "output_change_rel": _max_rel(src, peer_path, _SIZE.value)},
      "graph_prune": {"params": _params(ours_path), "latency_ms": ours_ms,
                      "speedup": base_ms / ours_ms, "prune_s": ours_time,
                      "file_s": ours_file_time,
                      "verified": doc["verify"]["passed"],
                      "verify_max_rel_diff": doc["verify"]["max_rel_diff"],
                      "output_change_rel": _max_rel(src, ours_path, _SIZE.value),
                      "groups_pruned": doc["groups_pruned"], "groups_total": doc["groups_total"]},
  }


def main(argv):
  del argv
  tmp = tempfile.mkdtemp()
  results = {}
  header = (f"{'model':12}{'tool':12}{'params kept':>14}{'kept %':>8}{'latency ms':>12}"
            f"{'speedup':>9}{'prune s':>9}{'file s':>8}  verified")
  print(header)
  for name in _MODELS.value:
    r = run_model(name, tmp)
    results[name] = r
    print(f"{name:12}{'original':12}{r['params']:>14,}{100:>8.1f}{r['latency_ms']:>12.3f}"
          f"{r['control_speedup']:>9.2f}  (speedup of an identical copy: the noise floor)")
    for tool in ("onnxsim", "graph_prune"):
      t = r[tool]
      note = "yes" if t["verified"] else ("no (" + t["error"] + ")" if t.get("error") else "no")
      print(f"{'':12}{tool:12}{t['params']:>14,}{100 * t['params'] / r['params']:>8.1f}"
            f"{t['latency_ms']:>12.3f}{t['speedup']:>9.2f}{t['prune_s']:>9.3f}"
            f"{t.get('file_s', float('nan')):>8.2f}  {note}",
            flush=True)
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(results, f, indent=1, sort_keys=True)


if __name__ == "__main__":
  app.run(main)
