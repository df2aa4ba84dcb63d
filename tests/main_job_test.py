"""The main job (//tools:main_job, what `bash tools/run_default.sh` runs with no
arguments), shortened: it prunes, restores, evaluates and benchmarks, and its
summary block and summary.json hold the figures a new user needs."""

import json
import os
import subprocess

from absl.testing import absltest

from tests import binaries


class MainJobTest(absltest.TestCase):

  def test_summary(self):
    out = self.create_tempdir().full_path
    res = subprocess.run(
        binaries.command("main_job") + [f"--out_dir={out}", "--calibration_samples=800",
                                        "--distill_steps=30", "--bench_seconds=0.3"],
        capture_output=True, text=True, env=binaries.env(), check=False)
    self.assertEqual(res.returncode, 0, res.stderr[-3000:])
    with open(os.path.join(out, "summary.json"), encoding="utf-8") as f:
      s = json.load(f)
    self.assertEqual(s["params"], [287850, 72506])
    self.assertGreater(s["file_bytes"][0], 3 * s["file_bytes"][1])
    self.assertEqual(s["test_samples"], 10000)
    self.assertAlmostEqual(s["top1"][0], 0.9281)
    self.assertGreater(s["top1"][1], 0.85)          # restored: not the chance of a bare slice
    self.assertLess(s["verify_max_rel_diff"], 1e-4)
    self.assertEqual(s["reconstruction"]["method"], "lsq")
    self.assertEqual(s["distillation"]["steps"], 30)
    self.assertEqual(sorted(s["speedup"]), ["1", "32"])
    self.assertTrue(all(v > 0 for v in s["speedup"].values()))
    for name in ("fmnist_vgg_bn_pruned.pb", "report.json", "plan.json", "bench.json"):
      self.assertTrue(os.path.isfile(os.path.join(out, name)), name)
    for needle in ("test top-1", "latency, batch 32", "x faster", "restored by: lsq",
                   "verified: the slicing is exact"):
      self.assertIn(needle, res.stdout)


if __name__ == "__main__":
  absltest.main()
