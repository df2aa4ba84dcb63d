"""The sweep: rows, resume after a kill, plots, the command line.

The model is the built-in default (models/default, a VGG-style BN network on
28x28x1). A tiny sweep, 2 ratios x 2 criteria x round_to 1, runs once in the test
process with a short timing budget; accuracy is measured on random images
labelled with the original's own predictions, so the original's top-1 is exactly
1 and a pruned model's top-1 equals its agreement with the original.
"""

import csv
import dataclasses
import json
import os
import shutil
import signal
import stat
import subprocess
import time
from unittest import mock

import numpy as np
from absl.testing import absltest
from absl.testing import parameterized

import graph_prune
from graph_prune import errors
from graph_prune import pipeline
from graph_prune.bench import timing
from graph_prune.bench import widths
from graph_prune.sweep import config
from graph_prune.sweep import rows as rows_lib
from graph_prune.sweep import sweep
from tests import binaries

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(graph_prune.__file__)))
_SWEEP = os.path.join(_ROOT, "tools", "sweep.py")
_MODEL = os.path.join(_ROOT, "models", "default", "fmnist_vgg_bn.pb")
_SHORT = timing.Settings(warmup=1, min_runs=3, max_seconds=0.3)
_SAMPLES = 64
_PNG = b"\x89PNG\r\n\x1a\n"


def _cli(*args, timeout=600):
  env = dict(os.environ, PYTHONPATH=_ROOT, TF_CPP_MIN_LOG_LEVEL="3")
  return subprocess.run([*binaries.command("sweep"), *args], capture_output=True, text=True,
                        env=env, timeout=timeout, check=False)


def _lines(path):
  with open(path, "rb") as f:
    return f.read().splitlines(keepends=True)


def _keys(path):
  return [json.loads(l)["key"] for l in _lines(path)]


def _labelled_npz(path):
  """Random images in [0, 1], labelled with the original model's predictions."""
  from graph_prune.adapters import tf_model  # pylint: disable=g-import-not-at-top
  x = np.random.default_rng(0).uniform(0, 1, (_SAMPLES, 28, 28, 1)).astype(np.float32)
  runner = tf_model.Runner(tf_model.load(_MODEL))
  try:
    y = np.argmax(runner([x])[0], axis=1)
  finally:
    runner.close()
  np.savez(path, x=x, y=y.astype(np.int64))


class ParseTest(parameterized.TestCase):
  """The list flags and the run keys (no models)."""

  def test_ratios(self):
    self.assertEqual(config.parse_ratios(["0.1", "0.2", "...", "0.9"]),
                     (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9))
    self.assertEqual(config.parse_ratios(["0", "0.25", "...", "0.75", "0.8"]),
                     (0.0, 0.25, 0.5, 0.75, 0.8))
    self.assertEqual(config.parse_ratios([" 0.5 "]), (0.5,))

  @parameterized.parameters(
      (["0.1", "x"], "not a number"), (["1.0"], "outside"), (["-0.1"], "outside"),
      (["0.5", "0.5"], "listed twice"), ([], "empty"), (["0.1", "...", "0.9"], "needs two"),
      (["0.1", "0.2", "..."], "needs two"), (["0.1", "0.2", "...", "0.55"], "not reached"),
      (["0.3", "0.2", "...", "0.1"], "not reached"), (["nan"], "finite"))
  def test_bad_ratios(self, values, needle):
    with self.assertRaisesRegex(errors.UsageError, needle):
      config.parse_ratios(values)

  def test_criteria_and_round_to(self):
    self.assertEqual(config.parse_criteria(["l1", "fpgm"]), ("l1", "fpgm"))
    self.assertEqual(config.parse_round_to(["1", "auto", "16"]), (1, "auto", 16))
    for bad in (["l3"], [], ["l1", "l1"]):
      with self.assertRaises(errors.UsageError):
        config.parse_criteria(bad)
    for bad in (["0"], ["x"], [], ["8", "8"], ["-8"]):
      with self.assertRaises(errors.UsageError):
        config.parse_round_to(bad)

  def test_plan_keys(self):
    settings = config.Config(_MODEL, "unused", (0.25, 0.5), ("l1", "random"), (1, "auto"))
    keys = [s.key for s in config.plan_runs(settings)]
    self.assertEqual(keys, ["r0.25_l1_rt1", "r0.25_l1_rtauto", "r0.25_random_rt1",
                            "r0.25_random_rtauto", "r0.5_l1_rt1", "r0.5_l1_rtauto",
                            "r0.5_random_rt1", "r0.5_random_rtauto"])
    self.assertEqual(config.model_path(settings, keys[0]),
                     os.path.join("unused", "models", "r0.25_l1_rt1.pb"))


  def test_budget_and_allocation_keys(self):
    settings = config.Config(_MODEL, "unused", (0.5,), ("l1",), (1,),
                             allocations=("uniform", "latency"), target_speedups=(1.5, 2.0))
    self.assertEqual([s.key for s in config.plan_runs(settings)],
                     ["s1.5_l1_rt1", "s1.5_l1_rt1_alatency", "s2_l1_rt1", "s2_l1_rt1_alatency"])
    self.assertEqual(config.plan_runs(settings)[1].target_speedup, 1.5)
    # Without budgets or other allocations, keys and definitions are as before.
    plain = config.Config(_MODEL, "unused", (0.5,), ("l1",), (1,))
    self.assertFalse(plain.budgeted)
    self.assertEqual([s.key for s in config.plan_runs(plain)], ["r0.5_l1_rt1"])
    self.assertEqual(config.parse_allocations(["global", "latency"]), ("global", "latency"))
    self.assertEqual(config.parse_target_speedups(["1.5", "3"]), (1.5, 3.0))
    for bad in (["knapsack"], ["global", "global"]):
      with self.assertRaises(errors.UsageError):
        config.parse_allocations(bad)
    for bad in (["1"], ["0.5"], ["x"], ["2", "2"]):
      with self.assertRaises(errors.UsageError):
        config.parse_target_speedups(bad)


class RowsFileTest(absltest.TestCase):
  """The JSONL file: durable appends, a torn tail dropped, corruption refused."""

  def test_append_read_and_torn_tail(self):
    path = os.path.join(self.create_tempdir().full_path, "rows.jsonl")
    self.assertEqual(rows_lib.read(path), ([], 0, False))
    rows_lib.append(path, {"key": "a", "x": 1.5, "y": float("inf")})
    rows_lib.append(path, {"key": "b", "x": None})
    good = os.path.getsize(path)
    with open(path, "ab") as f:
      f.write(b'{"key": "c", "x"')
    rows, length, torn = rows_lib.read(path)
    self.assertEqual(rows, [{"key": "a", "x": 1.5, "y": None}, {"key": "b", "x": None}])
    self.assertEqual((length, torn), (good, True))
    rows_lib.truncate(path, length)
    self.assertEqual(rows_lib.read(path), (rows, good, False))

  def test_bad_middle_line_and_duplicates_are_refused(self):
    tmp = self.create_tempdir().full_path
    bad = os.path.join(tmp, "bad.jsonl")
    with open(bad, "wb") as f:
      f.write(b'{"key": "a"}\nnot json\n{"key": "b"}\n')
    with self.assertRaisesRegex(errors.InputError, "line 2 is not a JSON row"):
      rows_lib.read(bad)
    dup = os.path.join(tmp, "dup.jsonl")
    with open(dup, "wb") as f:
      f.write(b'{"key": "a"}\n{"key": "a"}\n')
    with self.assertRaisesRegex(errors.InputError, "more than one row for a"):
      rows_lib.read(dup)

  def test_csv(self):
    data = rows_lib.to_csv([{"key": "a", "ok": True, "v": None}, {"key": "b", "extra": 2}],
                           ["key", "v"])
    self.assertEqual(data.decode(), "key,v,ok,extra\na,,true,\nb,,,2\n")
    path = os.path.join(self.create_tempdir().full_path, "rows.csv")
    old = os.umask(0o022)
    try:
      rows_lib.write_csv(path, [{"key": "a"}])
    finally:
      os.umask(old)
    self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o644)  # readable, like any output
    self.assertEqual([n for n in os.listdir(os.path.dirname(path))], ["rows.csv"])


class _FakeRecovery:
  """Stands in for a recovery step: a column per run; fails for one ratio."""
  name = "recovery"
  columns = ("top1_recovered",)

  def __init__(self):
    self.seen = []

  def __call__(self, ctx):
    self.seen.append((ctx.run.key, os.path.exists(ctx.pruned), ctx.row["flops_reduction"]))
    if ctx.run.ratio == 0.5:
      raise errors.UsageError("no data to recover with")
    return {"top1_recovered": 0.75}


class SweepTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    tmp = absltest.get_default_test_tmpdir()
    cls.npz = os.path.join(tmp, "labelled.npz")
    _labelled_npz(cls.npz)
    cls.dir = os.path.join(tmp, "sweep")
    shutil.rmtree(cls.dir, ignore_errors=True)
    cls.config = config.Config(
        model=_MODEL, out_dir=cls.dir, ratios=(0.3, 0.6), criteria=("l1", "fpgm"),
        round_to=(1,), batch_sizes=(1, 2), device="cpu", timing=_SHORT, memory=True,
        memory_runs=1, data=config.Data(cls.npz))
    cls.progress = []
    cls.summary = sweep.run(cls.config, progress=lambda *a: cls.progress.append(a),
                            notify=lambda line: None)
    cls.rows = [json.loads(l) for l in _lines(os.path.join(cls.dir, "rows.jsonl"))]
    # The flags that make the same sweep on the command line.
    cls.flags = [f"--in={_MODEL}", f"--out_dir={cls.dir}", "--ratios=0.3,0.6",
                 "--criteria=l1,fpgm", "--round_to=1", "--batch_sizes=1,2", "--device=cpu",
                 "--warmup=1", "--min_runs=3", "--max_seconds=0.3", "--memory_runs=1",
                 f"--data={cls.npz}"]

  def _copy(self):
    dst = os.path.join(self.create_tempdir().full_path, "sweep")
    shutil.copytree(self.dir, dst)
    return dst

  def test_rows(self):
    expected = ["r0.3_l1_rt1", "r0.3_fpgm_rt1", "r0.6_l1_rt1", "r0.6_fpgm_rt1"]
    self.assertEqual([r["key"] for r in self.rows], expected)
    self.assertEqual((self.summary.runs, self.summary.new, self.summary.skipped,
                      self.summary.failed), (4, 4, 0, 0))
    self.assertEqual([(i, n, row["key"]) for i, n, row, _ in self.progress],
                     [(i, 4, k) for i, k in enumerate(expected, 1)])
    cols = rows_lib.columns((1, 2), accuracy=True)
    for c in ("key", "model", "ratio", "criterion", "round_to", "round_to_used", "status",
              "params_orig", "params_pruned", "flops_reduction", "verify_max_rel_diff",
              "b1_latency_orig_median_ms", "b2_latency_pruned_p90_ms", "b2_speedup_median",
              "b1_speedup_p10", "b1_peak_orig_bytes", "b2_peak_pruned_bytes",
              "const_bytes_pruned", "prune_s", "top1_orig", "top1", "agreement_top1"):
      self.assertIn(c, cols)
    for r in self.rows:
      self.assertEqual(tuple(r), cols)  # every column, in order
      self.assertEqual(r["status"], "ok", r["error"])
      self.assertIsNone(r["error"])
      self.assertEqual((r["model"], r["round_to"], r["round_to_used"]), ("fmnist_vgg_bn", 1, 1))
      self.assertGreater(r["params_orig"], r["params_pruned"])
      self.assertAlmostEqual(r["flops_reduction"], r["flops_orig"] / r["flops_pruned"])
      self.assertGreater(r["flops_reduction"], 1.0)
      self.assertGreater(r["const_bytes_orig"], r["const_bytes_pruned"])
      self.assertLessEqual(r["verify_max_rel_diff"], 1e-4)
      self.assertEqual((r["device"], r["runtime"], r["xla"]), ("cpu:0", "tensorflow-xla", True))
      for b in (1, 2):
        get = lambda name, b=b: r[rows_lib.batch_column(b, name)]
        self.assertGreater(get("speedup_median"), 0.0)
        self.assertLessEqual(get("speedup_p10"), get("speedup_median"))
        self.assertLessEqual(get("speedup_median"), get("speedup_p90"))
        self.assertGreaterEqual(get("speedup_pairs"), _SHORT.min_runs)
        self.assertAlmostEqual(get("efficiency"), get("speedup_median") / r["flops_reduction"])
        for model in ("orig", "pruned"):
          self.assertGreater(get(f"latency_{model}_median_ms"), 0.0)
          self.assertLessEqual(get(f"latency_{model}_median_ms"), get(f"latency_{model}_p90_ms"))
          self.assertGreater(get(f"peak_{model}_bytes"), 0)
      # Labels are the original's predictions: its top-1 is 1, the pruned model's
      # top-1 is its agreement with the original.
      self.assertEqual((r["top1_orig"], r["eval_samples"]), (1.0, _SAMPLES))
      self.assertAlmostEqual(r["top1"], r["agreement_top1"])
      self.assertAlmostEqual(r["top1_drop"], 1.0 - r["top1"])
      self.assertTrue(os.path.isfile(os.path.join(self.dir, "models", r["key"] + ".pb")))
    for criterion in ("l1", "fpgm"):
      by_ratio = sorted((r["ratio"], r["flops_reduction"]) for r in self.rows
                        if r["criterion"] == criterion)
      self.assertLess(by_ratio[0][1], by_ratio[1][1])
    with open(os.path.join(self.dir, "rows.csv"), newline="", encoding="utf-8") as f:
      reader = csv.DictReader(f)
      self.assertEqual(tuple(reader.fieldnames), cols)
      table = list(reader)
    self.assertEqual([t["key"] for t in table], expected)
    for t, r in zip(table, self.rows):
      self.assertAlmostEqual(float(t["b2_speedup_median"]), r["b2_speedup_median"])
      self.assertEqual(t["error"], "")
    with open(os.path.join(self.dir, "sweep.json"), encoding="utf-8") as f:
      state = json.load(f)
    self.assertEqual(state["definition"]["ratios"], [0.3, 0.6])
    self.assertIsNone(state["round_to_auto"])
    self.assertEqual(state["baseline"]["accuracy"]["top1"], 1.0)

  def test_rows_as_tensorboard_hparams(self):
    import glob  # pylint: disable=g-import-not-at-top
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    from tensorflow.python.framework import tensor_util  # pylint: disable=g-import-not-at-top
    board = os.path.join(self.dir, "tensorboard")
    plugins, scalars = {}, {}
    for path in glob.glob(os.path.join(board, "**", "events.out.tfevents.*"), recursive=True):
      run = os.path.relpath(os.path.dirname(path), board)
      for event in tf.compat.v1.train.summary_iterator(path):
        for v in event.summary.value:
          if v.metadata.plugin_data.plugin_name == "hparams":
            plugins.setdefault(run, []).append(v.tag)
          elif v.tag in ("flops_reduction", "top1"):
            scalars[(run, v.tag)] = float(tensor_util.MakeNdarray(v.tensor))
    keys = [r["key"] for r in self.rows]
    self.assertEqual(sorted(plugins), sorted(keys + ["."]))   # the config, one run per row
    for r in self.rows:
      self.assertAlmostEqual(scalars[(r["key"], "flops_reduction")], r["flops_reduction"],
                             places=5)
      self.assertAlmostEqual(scalars[(r["key"], "top1")], r["top1"], places=5)

  def test_plots_are_pngs_and_plots_only_recreates_them(self):
    import matplotlib.image  # pylint: disable=g-import-not-at-top
    names = ["speedup_vs_flops_b1.png", "speedup_vs_flops_b2.png", "latency_vs_ratio.png",
             "memory_vs_ratio.png", "accuracy_vs_speedup.png"]
    self.assertEqual([os.path.basename(p) for p in self.summary.plots], names)
    plots_dir = os.path.join(self.dir, "plots")
    before = {}
    for name in names:
      with open(os.path.join(plots_dir, name), "rb") as f:
        before[name] = f.read()
      self.assertTrue(before[name].startswith(_PNG), name)
      image = matplotlib.image.imread(os.path.join(plots_dir, name))
      self.assertEqual(image.ndim, 3)
      self.assertGreater(min(image.shape[:2]), 300)
      self.assertGreater(float(image.std()), 0.01)  # not a blank canvas
    copy = self._copy()
    shutil.rmtree(os.path.join(copy, "plots"))
    paths = sweep.plots_only(copy)
    self.assertEqual([os.path.basename(p) for p in paths], names)
    for name in names:  # the same rows give the same files
      with open(os.path.join(copy, "plots", name), "rb") as f:
        self.assertEqual(f.read(), before[name], name)

  def test_rerun_skips_every_run(self):
    copy = self._copy()
    jsonl = os.path.join(copy, "rows.jsonl")
    before = _lines(jsonl)
    summary = sweep.run(dataclasses.replace(self.config, out_dir=copy), notify=lambda l: None)
    self.assertEqual((summary.new, summary.skipped, summary.torn_line_dropped), (0, 4, False))
    self.assertEqual(_lines(jsonl), before)

  def test_torn_last_line_is_run_again(self):
    copy = self._copy()
    jsonl = os.path.join(copy, "rows.jsonl")
    lines = _lines(jsonl)
    with open(jsonl, "wb") as f:
      f.write(b"".join(lines[:-1]) + lines[-1][:len(lines[-1]) // 2])
    # A kill between the JSONL append and the CSV rewrite: the CSV is behind.
    with open(os.path.join(copy, "rows.csv"), "wb") as f:
      f.write(b"key\n")
    summary = sweep.run(dataclasses.replace(self.config, out_dir=copy), notify=lambda l: None)
    self.assertEqual((summary.new, summary.skipped, summary.torn_line_dropped), (1, 3, True))
    after = _lines(jsonl)
    self.assertEqual(after[:3], lines[:3])  # earlier rows untouched
    self.assertLen(after, 4)
    self.assertEqual(_keys(jsonl), [r["key"] for r in self.rows])
    self.assertEqual(json.loads(after[3])["status"], "ok")
    with open(os.path.join(copy, "rows.csv"), newline="", encoding="utf-8") as f:
      self.assertEqual([t["key"] for t in csv.DictReader(f)], _keys(jsonl))

  def test_one_sweep_at_a_time_and_stale_temp_files_go(self):
    copy = self._copy()
    stale = os.path.join(copy, "models", ".gp_tmp_abc123")
    with open(stale, "wb") as f:
      f.write(b"half a model")
    import fcntl  # pylint: disable=g-import-not-at-top
    with open(os.path.join(copy, ".sweep.lock"), "a+b") as lock:
      fcntl.flock(lock, fcntl.LOCK_EX)  # as a running sweep holds it
      with self.assertRaisesRegex(errors.UsageError, "another sweep is running"):
        sweep.run(dataclasses.replace(self.config, out_dir=copy), notify=lambda l: None)
    self.assertTrue(os.path.exists(stale))
    summary = sweep.run(dataclasses.replace(self.config, out_dir=copy), notify=lambda l: None)
    self.assertEqual(summary.new, 0)
    self.assertFalse(os.path.exists(stale))

  def test_corrupt_middle_line_is_refused(self):
    copy = self._copy()
    jsonl = os.path.join(copy, "rows.jsonl")
    lines = _lines(jsonl)
    lines[1] = b"garbage\n"
    with open(jsonl, "wb") as f:
      f.write(b"".join(lines))
    with self.assertRaisesRegex(errors.InputError, "line 2 is not a JSON row"):
      sweep.run(dataclasses.replace(self.config, out_dir=copy), notify=lambda l: None)

  def test_auto_round_to_steps_keep_models_and_overwrite(self):
    tmp = self.create_tempdir().full_path
    # A latency table with a step every 16 channels: auto resolves to 16.
    cache_path = os.path.join(tmp, "widths.json")
    cache = widths.Cache(cache_path)
    device = widths.device_key(True)
    for w in widths.REPRESENTATIVE_WIDTHS:
      cache.put(device, widths.REPRESENTATIVE, w, 10.0 + 2.0 * ((w - 1) // 16))
    cache.save()
    out = self._copy()  # another sweep is there: --overwrite replaces it
    step = _FakeRecovery()
    settings = config.Config(
        model=_MODEL, out_dir=out, ratios=(0.3, 0.5), criteria=("l2",), round_to=("auto",),
        device="cpu", timing=_SHORT, memory=False, keep_models=False, widths_cache=cache_path)
    with self.assertRaisesRegex(errors.UsageError, "holds another sweep"):
      sweep.run(settings, steps=[step], notify=lambda l: None)
    summary = sweep.run(dataclasses.replace(settings, overwrite=True), steps=[step],
                        notify=lambda l: None)
    self.assertEqual(summary.round_to_auto["multiple"], 16)
    rows = [json.loads(l) for l in _lines(os.path.join(out, "rows.jsonl"))]
    self.assertEqual([r["key"] for r in rows], ["r0.3_l2_rtauto", "r0.5_l2_rtauto"])
    self.assertEqual([r["round_to_used"] for r in rows], [16, 16])
    self.assertEqual([r["status"] for r in rows], ["ok", "recovery_failed"])
    self.assertEqual([r["top1_recovered"] for r in rows], [0.75, None])
    self.assertIn("no data to recover with", rows[1]["error"])
    self.assertEqual(list(rows[0])[-3:], ["top1_recovered", "elapsed_s", "finished_at"])
    self.assertNotIn("top1", rows[0])  # no --data, no accuracy columns
    self.assertEqual(rows[0]["b1_peak_method"], "not measured")
    # The step saw the pruned model on disk; afterwards it is gone (keep_models=False).
    self.assertEqual([s[:2] for s in step.seen], [(r["key"], True) for r in rows])
    self.assertEqual(os.listdir(os.path.join(out, "models")), [])
    with open(os.path.join(out, "sweep.json"), encoding="utf-8") as f:
      state = json.load(f)
    self.assertEqual(state["round_to_auto"]["multiple"], 16)
    self.assertEqual(state["definition"]["steps"], ["recovery"])
    # The recorded multiple is used on resume, whatever the cache says now.
    os.remove(cache_path)
    os.remove(os.path.join(out, "rows.jsonl"))
    again = sweep.run(settings, steps=[step], notify=lambda l: None)
    self.assertEqual((again.new, again.round_to_auto["multiple"]), (2, 16))
    self.assertFalse(os.path.exists(cache_path))

  def test_failed_verification_is_a_row_not_a_crash(self):
    real_prune = pipeline.prune

    def prune(in_path, out_path, options):
      if options.ratio == 0.5:  # as the oracle reports a pruned model that differs
        raise errors.VerificationError("verification failed: pruned differs from the masked "
                                       "original by 0.3 (relative; tolerance 0.0001)")
      return real_prune(in_path, out_path, options)

    out = os.path.join(self.create_tempdir().full_path, "failing")
    settings = config.Config(model=_MODEL, out_dir=out, ratios=(0.5, 0.25), criteria=("l1",),
                          device="cpu", timing=_SHORT, memory=False)
    with mock.patch.object(pipeline, "prune", side_effect=prune):
      summary = sweep.run(settings, notify=lambda l: None)
    rows = [json.loads(l) for l in _lines(os.path.join(out, "rows.jsonl"))]
    self.assertEqual([(r["key"], r["status"]) for r in rows],
                     [("r0.5_l1_rt1", "verify_failed"), ("r0.25_l1_rt1", "ok")])
    self.assertIn("differs from the masked original by 0.3", rows[0]["error"])
    self.assertIsNone(rows[0]["b1_speedup_median"])
    self.assertGreater(rows[1]["b1_speedup_median"], 0)
    self.assertEqual(summary.failed, 1)
    self.assertFalse(os.path.exists(os.path.join(out, "models", "r0.5_l1_rt1.pb")))
    self.assertLen(summary.plots, 3)  # drawn from the rows that are ok

  def test_resume_after_sigkill(self):
    out = os.path.join(self.create_tempdir().full_path, "killed")
    args = [f"--in={_MODEL}", f"--out_dir={out}", "--ratios=0.2,0.4,0.6", "--criteria=l1",
            "--round_to=1", "--batch_sizes=1", "--device=cpu", "--nomemory", "--warmup=1",
            "--min_runs=3", "--max_seconds=0.2"]
    env = dict(os.environ, PYTHONPATH=_ROOT, TF_CPP_MIN_LOG_LEVEL="3")
    jsonl = os.path.join(out, "rows.jsonl")
    proc = subprocess.Popen([*binaries.command("sweep"), *args], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
      deadline = time.monotonic() + 400
      while time.monotonic() < deadline and proc.poll() is None:
        if os.path.exists(jsonl) and _lines(jsonl):
          break
        time.sleep(0.02)
      self.assertIsNone(proc.poll(), "the sweep ended before it could be killed")
      os.killpg(proc.pid, signal.SIGKILL)  # the sweep and its children, at once
    finally:
      if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
      proc.wait()
    self.assertEqual(proc.returncode, -signal.SIGKILL)
    with open(jsonl, "rb") as f:
      data = f.read()
    before = data[:data.rfind(b"\n") + 1]  # complete rows (a torn tail is not one)
    done = before.count(b"\n")
    self.assertBetween(done, 1, 2)
    r = _cli(*args)
    self.assertEqual(r.returncode, 0, r.stderr[-3000:])
    self.assertIn(f"sweep: resuming, {done} of 3 runs already in", r.stderr)
    self.assertIn(f"({3 - done} run now, {done} from before", r.stdout)
    with open(jsonl, "rb") as f:
      after = f.read()
    self.assertTrue(after.startswith(before))  # rows from before the kill: not re-run
    self.assertEqual(_keys(jsonl), ["r0.2_l1_rt1", "r0.4_l1_rt1", "r0.6_l1_rt1"])
    self.assertTrue(all(json.loads(l)["status"] == "ok" for l in _lines(jsonl)))
    progress = [l for l in r.stderr.splitlines() if l.startswith("sweep: [")]
    self.assertLen(progress, 3 - done)
    self.assertNotIn("bench: batch 1: timing", r.stderr)  # the benchmark's log only with -v 0
    self.assertTrue(progress[-1].startswith("sweep: [3/3] r0.6_l1_rt1: ok, FLOPs "), progress)

  def test_flagfile_and_flags_are_the_same_sweep(self):
    copy = self._copy()
    jsonl = os.path.join(copy, "rows.jsonl")
    before, state = _lines(jsonl), _lines(os.path.join(copy, "sweep.json"))
    flags = [f.replace(self.dir, copy) for f in self.flags]
    flagfile = os.path.join(self.create_tempdir().full_path, "sweep.flags")
    with open(flagfile, "w", encoding="utf-8") as f:
      f.write("# the tiny sweep\n" + "\n".join(flags) + "\n")
    for args in ([f"--flagfile={flagfile}"], flags):
      # Any other definition would be refused; the same one resumes with nothing to do.
      r = _cli(*args)
      self.assertEqual(r.returncode, 0, r.stderr[-3000:])
      self.assertIn("sweep: 4 runs (0 run now, 4 from before)", r.stdout)
      self.assertEqual(_lines(jsonl), before)
      self.assertEqual(_lines(os.path.join(copy, "sweep.json")), state)

  def test_mismatching_resume_is_refused(self):
    copy = self._copy()
    before = _lines(os.path.join(copy, "rows.jsonl"))
    flags = [f.replace(self.dir, copy) for f in self.flags]
    r = _cli(*[f if not f.startswith("--ratios") else "--ratios=0.3,0.7" for f in flags])
    self._check_error(r, "holds another sweep (ratios: [0.3, 0.6] there, [0.3, 0.7] now)")
    self.assertEqual(_lines(os.path.join(copy, "rows.jsonl")), before)

  def test_recovery_step_adds_accuracy_after_recovery(self):
    out = self.create_tempdir().full_path
    common = [f"--in={_MODEL}", f"--out_dir={out}", "--ratios=0.5", "--criteria=l1",
              "--batch_sizes=1", "--max_seconds=0.3", "--min_runs=3", "--nomemory",
              "--data=fashion-mnist:test", "--max_samples=1000", "--scale=1/255",
              "--recover=distill", "--recover_data=fashion-mnist:train",
              "--holdout_samples=500"]
    r = _cli(*common, "--recover_train_steps=150")
    self.assertEqual(r.returncode, 0, r.stderr[-3000:])
    (row,) = [json.loads(l) for l in _lines(os.path.join(out, "rows.jsonl"))]
    self.assertEqual(row["status"], "ok")
    self.assertEqual(row["recover_method"], "distill")
    self.assertEqual(row["recover_train_steps"], 150)
    # Pruning at 0.5 without recovery leaves a near-constant classifier; 150 steps of
    # distillation bring most of the agreement back, measured on test images.
    self.assertLess(row["agreement_top1"], 0.5)
    self.assertGreater(row["agreement_recovered"], row["agreement_top1"] + 0.3)
    self.assertGreater(row["top1_recovered"], row["top1"] + 0.3)
    self.assertAlmostEqual(row["top1_recovered_drop"], row["top1_orig"] - row["top1_recovered"])
    self.assertGreater(row["holdout_agreement_after"], row["holdout_agreement_before"])
    with open(os.path.join(out, "rows.csv"), newline="", encoding="utf-8") as f:
      header = next(csv.reader(f))
    self.assertIn("top1_recovered", header)
    with open(os.path.join(out, "plots", "accuracy_vs_speedup.png"), "rb") as f:
      self.assertEqual(f.read(8), _PNG)
    self.assertTrue(os.path.exists(os.path.join(out, "models", "r0.5_l1_rt1_recovered.pb")))
    self.assertFalse(os.path.exists(os.path.join(out, "checkpoints", "r0.5_l1_rt1")))
    # Another recovery budget is another sweep.
    r = _cli(*common, "--recover_train_steps=300")
    self._check_error(r, "holds another sweep")

  def test_reconstruction_columns(self):
    out = self.create_tempdir().full_path
    r = _cli(f"--in={_MODEL}", f"--out_dir={out}", "--ratios=0.5", "--criteria=activation",
             "--batch_sizes=1", "--max_seconds=0.3", "--min_runs=3", "--nomemory",
             "--data=fashion-mnist:test", "--max_samples=1000", "--scale=1/255",
             "--reconstruct=lsq", "--calibration_data=fashion-mnist:train",
             "--calibration_samples=800", "--calibration_holdout=200")
    self.assertEqual(r.returncode, 0, r.stderr[-3000:])
    (row,) = [json.loads(l) for l in _lines(os.path.join(out, "rows.jsonl"))]
    self.assertEqual(row["status"], "ok", row["error"])
    self.assertEqual((row["reconstruct_method"], row["reconstruct_layers"]), ("lsq", 6))
    self.assertLess(row["holdout_agreement_sliced"], 0.5)
    self.assertGreater(row["holdout_agreement_reconstructed"], 0.8)
    self.assertLess(row["holdout_rel_error_reconstructed"], row["holdout_rel_error_sliced"])
    # The evaluated (and benchmarked) model is the reconstructed one.
    self.assertGreater(row["top1"], 0.8)
    self.assertEqual(tuple(row), rows_lib.columns((1,), accuracy=True, reconstruct=True))

  def test_target_speedups_and_allocations(self):
    # A measured budget per run, uniform and latency-aware, timed at batch 32 as
    # //tools:prune --target_speedup does; the rows carry what the command measured.
    out = self.create_tempdir().full_path
    r = _cli(f"--in={_MODEL}", f"--out_dir={out}", "--target_speedups=1.5",
             "--allocations=uniform,latency", "--criteria=l1", "--batch_sizes=32",
             "--max_seconds=0.5", "--min_runs=3", "--nomemory",
             f"--widths_cache={os.path.join(out, 'widths.json')}")
    self.assertEqual(r.returncode, 0, r.stderr[-3000:])
    rows = [json.loads(l) for l in _lines(os.path.join(out, "rows.jsonl"))]
    self.assertEqual([row["key"] for row in rows], ["s1.5_l1_rt1", "s1.5_l1_rt1_alatency"])
    for row, how in zip(rows, ("uniform", "latency")):
      self.assertEqual(row["status"], "ok", row["error"])
      self.assertEqual((row["allocation"], row["target_speedup"]), (how, 1.5))
      self.assertGreaterEqual(row["budget_speedup"], 1.5 * 0.95)
      self.assertGreater(row["ratio"], 0)          # the chosen plan's fraction removed
      self.assertIsNotNone(row["b32_speedup_median"])
    self.assertIsNone(rows[0]["budget_predicted_speedup"])
    self.assertGreater(rows[1]["budget_predicted_speedup"], 1.0)
    self.assertEqual(tuple(rows[0]), rows_lib.columns((32,), accuracy=False, budget=True))

  def _check_error(self, r, needle):
    self.assertEqual(r.returncode, 2, r.stderr[-3000:])
    lines = [l for l in r.stderr.splitlines() if l.startswith("sweep: ")]
    self.assertLen(lines, 1, r.stderr[-3000:])
    self.assertTrue(lines[0].startswith("sweep: error: "), lines[0])
    self.assertIn(needle, lines[0])
    self.assertNotIn("Traceback", r.stderr)
    self.assertEqual(r.stdout, "")

  @parameterized.named_parameters(
      ("missing_model", ["--in=/no/such/model.pb"], "does not exist"),
      ("missing_in", ["--in="], "--in is required"),
      ("bad_ratio", ["--ratios=0.1,x"], "'x' is not a number"),
      ("ratio_out_of_range", ["--ratios=0.5,1.5"], "ratio 1.5 is outside [0, 1)"),
      ("bad_ellipsis", ["--ratios=0.1,0.2,...,0.55"], "not reached"),
      ("unknown_criterion", ["--criteria=l1,l3"], "unknown criterion 'l3'"),
      ("bad_round_to", ["--round_to=1,0"], "'0' is not a positive integer or 'auto'"),
      ("bad_batch", ["--batch_sizes=1,x"], "not a positive integer"),
      ("bad_device", ["--device=fpga"], "unknown device"),
      ("bad_timing", ["--min_runs=0"], "--min_runs"),
      ("unwritable_out_dir", ["--out_dir={file}/sub"], "is not a writable directory"),
      ("out_dir_is_file", ["--out_dir={file}"], "is a file"),
      ("plots_only_without_sweep", ["--plots_only"], "holds no sweep"),
      ("calibrated_without_data", ["--criteria=l1,apoz"], "apoz: give --calibration_data"),
      ("reconstruct_without_data", ["--reconstruct=bias"],
       "--reconstruct: give --calibration_data"),
      ("unknown_allocation", ["--allocations=uniform,knapsack"], "unknown allocation 'knapsack'"),
      ("latency_without_targets", ["--allocations=latency"], "give --target_speedups"),
      ("targets_with_ratios", ["--ratios=0.5", "--target_speedups=2"], "replace --ratios"),
      ("target_not_above_one", ["--target_speedups=1,2"], "1 is not above 1"),
  )
  def test_bad_input(self, args, needle):
    tmp = self.create_tempdir().full_path
    a_file = os.path.join(tmp, "notes.txt")
    with open(a_file, "w", encoding="utf-8") as f:
      f.write("not a directory\n")
    out = os.path.join(tmp, "out")
    base = {"--in": f"--in={_MODEL}", "--out_dir": f"--out_dir={out}"}
    for a in args:
      base[a.split("=")[0]] = a.format(file=a_file)
    r = _cli(*base.values(), timeout=120)
    self._check_error(r, needle)
    self.assertFalse(os.path.exists(out))  # nothing written


if __name__ == "__main__":
  absltest.main()
