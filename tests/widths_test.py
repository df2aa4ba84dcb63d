"""Channel-width profiling and --round_to=auto."""

import json
import os
import subprocess
import sys

import numpy as np
from absl.testing import absltest

import graph_prune
from graph_prune.bench import widths
from tests import binaries

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(graph_prune.__file__)))


def _staircase(period, lo=1, hi=160, step_ms=2.0, noise=0.01, seed=0):
  """Latency that rises by step_ms after every `period` channels, with noise."""
  rng = np.random.default_rng(seed)
  return {w: (10.0 + step_ms * ((w - 1) // period)) * (1 + noise * rng.standard_normal())
          for w in range(lo, hi + 1)}


def _run(tool, *args):
  return subprocess.run([*binaries.command(tool.removesuffix(".py")), *args],
                        capture_output=True, text=True, env=binaries.env(), timeout=600,
                        check=False)


class FavouredMultipleTest(absltest.TestCase):

  def test_finds_the_step_of_a_staircase(self):
    for period in (4, 8, 16, 32):
      self.assertEqual(widths.favoured_multiple(_staircase(period)), period, period)

  def test_one_lucky_timing_does_not_hide_the_step(self):
    latency = _staircase(16, lo=97, hi=160)
    latency[97] *= 0.85
    self.assertEqual(widths.favoured_multiple(latency), 16)

  def test_cost_per_channel_favours_nothing(self):
    self.assertEqual(widths.favoured_multiple({w: float(w) for w in range(1, 129)}), 1)

  def test_needs_two_full_blocks(self):
    self.assertEqual(widths.favoured_multiple(_staircase(64, lo=1, hi=100)), 32)


class ProfileAndCacheTest(absltest.TestCase):

  def test_second_profile_comes_from_the_cache(self):
    path = os.path.join(self.create_tempdir().full_path, "w.json")
    layer = widths.Layer(8, 8, 4, 3, 1)
    first = widths.profile(layer, [3, 4], widths.Cache(path), runs=3)
    self.assertEqual(sorted(first), [3, 4])
    self.assertTrue(all(v > 0 for v in first.values()))
    calls = []
    original = widths._time_conv
    widths._time_conv = lambda *a, **k: calls.append(a) or 1.0
    try:
      again = widths.profile(layer, [3, 4, 5], widths.Cache(path), runs=3)
    finally:
      widths._time_conv = original
    self.assertEqual(len(calls), 1)            # only width 5 was new
    self.assertEqual({w: again[w] for w in (3, 4)}, first)
    table = json.load(open(path))
    (device,) = table
    self.assertIn("|xla|tf ", device)
    self.assertEqual(sorted(table[device][layer.key]), ["3", "4", "5"])


class RoundToAutoTest(absltest.TestCase):

  def test_auto_uses_the_measured_multiple(self):
    tmp = self.create_tempdir().full_path
    cache = os.path.join(tmp, "w.json")
    c = widths.Cache(cache)
    device = widths.device_key(True)
    for w, ms in _staircase(16, lo=97, hi=160).items():
      c.put(device, widths.REPRESENTATIVE, w, ms)
    c.save()
    report = os.path.join(tmp, "r.json")
    r = _run("prune.py", f"--in={_ROOT}/models/default/fmnist_vgg_bn.pb", f"--out={tmp}/p.pb",
             "--ratio=0.6", "--round_to=auto", f"--widths_cache={cache}", f"--report={report}")
    self.assertEqual(r.returncode, 0, r.stderr[-2000:])
    self.assertIn("round_to=auto: 16 (measured on this CPU", r.stdout)
    doc = json.load(open(report))
    self.assertEqual(doc["round_to"], 16)
    self.assertTrue(all(g["channels_after"] % 16 == 0 for g in doc["groups"]), doc["groups"])

  def test_bad_round_to_and_bad_layer(self):
    tmp = self.create_tempdir().full_path
    r = _run("prune.py", f"--in={_ROOT}/models/default/fmnist_vgg_bn.pb", f"--out={tmp}/p.pb",
             "--round_to=lots")
    self.assertEqual(r.returncode, 2)
    self.assertIn("prune: error: --round_to must be", r.stderr)
    r = _run("profile_widths.py", f"--in={_ROOT}/models/default/fmnist_vgg_bn.pb",
             "--layer=nope", f"--cache={tmp}/w.json")
    self.assertEqual(r.returncode, 2)
    self.assertIn("profile_widths: error: no node 'nope'", r.stderr)
    self.assertEqual(os.listdir(tmp), [])


if __name__ == "__main__":
  absltest.main()
