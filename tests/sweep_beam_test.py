"""The sweep on Apache Beam (//tools:sweep --runner=DirectRunner, two worker
processes): the same rows as the local sweep apart from timings, rows written by
the pipeline, a killed Beam sweep resumes without losing or repeating a row, and
bad runners and options are refused in one line."""

import json
import os
import signal
import subprocess
import sys
import time
from unittest import mock

from absl.testing import absltest
import numpy as np
import onnx

from graph_prune import errors
from graph_prune.bench import timing
from graph_prune.sweep import config
from graph_prune.sweep import sweep
from tests import binaries
from tests import onnx_net

_TWO_WORKERS = ("--direct_num_workers=2", "--direct_running_mode=multi_processing")
# Columns that depend on when and how fast a run went.
_TIMED = ("prune_s", "bench_s", "eval_s", "elapsed_s", "finished_at", "latency", "speedup",
          "efficiency", "converged", "peak_", "reconstruct_s", "quantize_s")


def _model(path):
  net = onnx_net.Net(0)
  h = net.op("Relu", [net.conv("x", 3, 16)])
  h = net.op("Relu", [net.conv(h, 16, 16)])
  h = net.op("Flatten", [net.op("GlobalAveragePool", [h])])
  onnx.save(net.model(net.dense(h, (16, 10)), [10]), path)


def _labelled(path, model):
  from graph_prune.adapters import onnx_model  # pylint: disable=g-import-not-at-top
  x = np.random.default_rng(0).standard_normal((64, 8, 8, 3)).astype(np.float32)
  y = onnx_model.Runner(onnx_model.load(model))([x.transpose(0, 3, 1, 2)])[0].argmax(1)
  np.savez(path, x=x, y=y.astype(np.int64))


def _rows(out_dir):
  with open(os.path.join(out_dir, "rows.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def _untimed(row):
  return {k: v for k, v in row.items() if not any(t in k for t in _TIMED)}


class BeamSweepTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = absltest.get_default_test_tmpdir()
    cls.model = os.path.join(cls.tmp, "small.onnx")
    _model(cls.model)
    cls.data = os.path.join(cls.tmp, "labelled.npz")
    _labelled(cls.data, cls.model)

  def _config(self, out_dir, **kw):
    return config.Config(
        model=self.model, out_dir=out_dir, ratios=(0.25, 0.5), criteria=("l1", "l2"),
        batch_sizes=(1,), device="cpu", timing=timing.Settings(warmup=1, min_runs=3,
                                                                max_seconds=0.3),
        memory=False, data=config.Data(self.data), **kw)

  def test_same_rows_as_the_local_sweep(self):
    local, beam = (os.path.join(self.create_tempdir().full_path, d) for d in ("local", "beam"))
    sweep.run(self._config(local), notify=lambda line: None)
    summary = sweep.run(self._config(beam), notify=lambda line: None, runner="DirectRunner",
                        beam_options=_TWO_WORKERS)
    self.assertEqual((summary.runs, summary.new, summary.failed), (4, 4, 0))
    a, b = _rows(local), _rows(beam)
    self.assertEqual([r["key"] for r in b], ["r0.25_l1_rt1", "r0.25_l2_rt1", "r0.5_l1_rt1",
                                             "r0.5_l2_rt1"])
    self.assertEqual([_untimed(r) for r in a], [_untimed(r) for r in b])
    for r in b:
      self.assertEqual(r["status"], "ok", r["error"])
      self.assertGreater(r["b1_speedup_median"], 0)
      self.assertIsNotNone(r["top1"])
    self.assertTrue(os.path.isfile(os.path.join(beam, "rows.csv")))
    # Run again: every run has its row, nothing runs.
    again = sweep.run(self._config(beam), notify=lambda line: None, runner="DirectRunner",
                      beam_options=_TWO_WORKERS)
    self.assertEqual((again.new, again.skipped), (0, 4))

  def test_killed_beam_sweep_resumes(self):
    out = os.path.join(self.create_tempdir().full_path, "sweep")
    args = [*binaries.command("sweep"), f"--in={self.model}", f"--out_dir={out}",
            "--ratios=0.2,0.4,0.6", "--criteria=l1,l2", "--batch_sizes=1,2", "--device=cpu",
            "--max_seconds=1", "--nomemory", "--runner=DirectRunner",
            f"--beam_options={','.join(_TWO_WORKERS)}"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=binaries.env(), start_new_session=True)
    jsonl = os.path.join(out, "rows.jsonl")
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
      if os.path.exists(jsonl) and os.path.getsize(jsonl) > 0:
        break
      time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)   # the workers too
    proc.wait()
    first = _rows(out)
    self.assertNotEmpty(first)
    self.assertLess(len(first), 6, "the sweep ended before the kill; nothing was tested")
    with open(jsonl, "rb") as f:
      before = f.read()
    r = subprocess.run(args, capture_output=True, text=True, env=binaries.env(), timeout=600,
                       check=False)
    self.assertEqual(r.returncode, 0, r.stderr[-2000:])
    rows = _rows(out)
    keys = [row["key"] for row in rows]
    self.assertCountEqual(keys, [f"r{x}_{c}_rt1" for x in (0.2, 0.4, 0.6) for c in ("l1", "l2")])
    with open(jsonl, "rb") as f:
      self.assertTrue(f.read().startswith(before.rsplit(b"\n", 1)[0]))

  def test_bad_runner_and_options(self):
    out = os.path.join(self.create_tempdir().full_path, "sweep")
    for extra, message in (
        (["--runner=Nope"], "unknown --runner 'Nope'"),
        (["--runner=DirectRunner", "--beam_options=--direct_num_workers=abc"],
         "invalid int value: 'abc'"),
        (["--runner=DirectRunner", "--beam_options=--no_such_option=1"],
         "Beam knows no option '--no_such_option'"),
        (["--beam_options=--direct_num_workers=2"], "apply to a Beam --runner")):
      r = subprocess.run([*binaries.command("sweep"), f"--in={self.model}", f"--out_dir={out}",
                          "--ratios=0.5", "--criteria=l1", *extra], capture_output=True,
                         text=True, env=binaries.env(), timeout=300, check=False)
      self.assertEqual(r.returncode, 2, (extra, r.stderr[-1000:]))
      lines = [l for l in r.stderr.splitlines() if l.startswith("sweep: ")]
      self.assertLen(lines, 1, r.stderr[-2000:])
      self.assertIn(message, lines[0])
      self.assertFalse(os.path.exists(os.path.join(out, "rows.jsonl")))
    with self.assertRaises(errors.UsageError):
      sweep.run(self._config(out), runner="FlinkRunner", beam_options=("--flink_version=0",))
    # Without Apache Beam installed, the message names the package.
    with mock.patch.dict(sys.modules, {"apache_beam": None, "apache_beam.options": None,
                                       "apache_beam.options.pipeline_options": None}):
      with self.assertRaisesRegex(errors.UsageError, r"pip install apache-beam==2\.77\.0"):
        sweep.run(self._config(out), runner="DirectRunner")


if __name__ == "__main__":
  absltest.main()
