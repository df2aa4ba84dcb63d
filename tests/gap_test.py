"""Grow-and-prune (--recover=gap) on the built-in model: the parts take turns, the
result has exactly the target widths and passes the oracle against the last grown
state masked, and the weight masks make a full-width model compute what the pruned
model computes."""

import os
from unittest import mock

from absl.testing import absltest
import numpy as np

from graph_prune import errors
from graph_prune import pipeline
from graph_prune.recover import gap
from graph_prune.recover import options as options_lib
from graph_prune.recover import recover
from graph_prune.recover import train
from tests import binaries

DEFAULT = os.path.join(binaries.ROOT, "models", "default", "fmnist_vgg_bn.pb")


def _options(tmp, **recover_kw):
  from graph_prune.data import preprocess  # pylint: disable=g-import-not-at-top
  kw = dict(method=options_lib.GAP, data="fashion-mnist:train", holdout_samples=300,
            preprocess=preprocess.Preprocess(scale=1 / 255), train_steps=60, gap_phase_steps=15,
            gap_parts=2, batch_size=32, learning_rate=1e-3, log_every=15)
  kw.update(recover_kw)
  return pipeline.Options(ratio=0.5, recover=recover.Recovery(options_lib.Options(**kw)),
                          report=os.path.join(tmp, "r.json"))


def _scalars(directory):
  """tag -> {step: value} of the TensorBoard event files under directory."""
  import glob  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from tensorflow.python.framework import tensor_util  # pylint: disable=g-import-not-at-top
  out = {}
  for path in glob.glob(os.path.join(directory, "**", "events.out.tfevents.*"), recursive=True):
    for event in tf.compat.v1.train.summary_iterator(path):
      for v in event.summary.value:
        out.setdefault(v.tag, {})[event.step] = float(tensor_util.MakeNdarray(v.tensor))
  return out


class GapTest(absltest.TestCase):

  def test_parts_take_turns_and_the_result_is_verified_at_target_widths(self):
    tmp = self.create_tempdir().full_path
    board = os.path.join(tmp, "tb")
    with mock.patch.object(train, "train", wraps=train.train) as trained:
      doc = pipeline.prune(DEFAULT, os.path.join(tmp, "out.pb"),
                           _options(tmp, tensorboard_dir=board))
    # Regression: every phase was trained with the same seed, so on the same first
    # batches of the data (its order is a function of the seed and the step).
    self.assertEqual([c.args[4].seed for c in trained.call_args_list], [0, 1, 2, 3])
    self.assertTrue(doc["verify"]["passed"])
    self.assertLess(doc["verify"]["max_rel_diff"], 1e-4)
    # Exactly the widths of plain pruning at 0.5.
    self.assertEqual([(g["channels_before"], g["channels_after"]) for g in doc["groups"]],
                     [(32, 16), (32, 16), (64, 32), (64, 32), (128, 64), (128, 64)])
    r = doc["recovery"]
    self.assertEqual((r["method"], r["gap_parts"], r["gap_phases"], r["train_steps"]),
                     ("gap", 2, 4, 60))
    grown = [tuple(p["grown_groups"]) for p in r["phases"]]
    self.assertEqual(grown[0], grown[2])
    self.assertEqual(grown[1], grown[3])
    self.assertNotEqual(grown[0], grown[1])
    self.assertEqual(sorted(grown[0] + grown[1]), [g["id"] for g in doc["groups"]])
    # Training moved the kept channels at least once, and recovered agreement.
    self.assertGreater(sum(p["channels_swapped"] for p in r["phases"]), 0)
    self.assertGreater(r["holdout_agreement_after"], r["holdout_agreement_before"] + 0.3)
    # TensorBoard: one curve over the phases (log_every 15 = one point per phase).
    scalars = _scalars(board)
    self.assertEqual(sorted(scalars["recover/loss"]), [15, 30, 45, 60])
    self.assertEqual(sorted(scalars["recover/learning_rate"]), [15, 30, 45, 60])
    self.assertTrue(all(0 <= v <= 1 for v in scalars["recover/agreement"].values()))

  def test_masked_full_width_model_equals_the_pruned_one(self):
    tmp = self.create_tempdir().full_path
    prepared = pipeline.prepare(DEFAULT)
    plan = pipeline.make_plan(prepared, pipeline.Options(ratio=0.5))
    masked = gap.masked(prepared.model, prepared.analysis, plan)
    pruned = pipeline.rewrite(prepared, plan)
    x = np.random.default_rng(0).uniform(0, 1, (8, 28, 28, 1)).astype(np.float32)
    adapter = prepared.format.adapter
    a, b = adapter.Runner(masked)([x])[0], adapter.Runner(pruned)([x])[0]
    self.assertLess(np.abs(a - b).max() / np.abs(a).max(), 1e-5)
    full = adapter.Runner(prepared.model)([x])[0]
    self.assertGreater(np.abs(a - full).max() / np.abs(full).max(), 1e-2)
    del tmp

  def test_gap_with_steps_is_refused(self):
    tmp = self.create_tempdir().full_path
    options = _options(tmp)
    import dataclasses  # pylint: disable=g-import-not-at-top
    with self.assertRaisesRegex(errors.UsageError, "leave --steps at 1"):
      pipeline.prune(DEFAULT, os.path.join(tmp, "o.pb"), dataclasses.replace(options, steps=2))


class GapFromScratchTest(absltest.TestCase):
  """//tools:train_default --gap_compare's runs, shortened: every run ends at the
  target widths, GaP's parts take turns, and graph_prune prunes each result to
  exactly those widths with the oracle passing."""

  def test_runs_end_at_target_widths_and_prune_for_real(self):
    from graph_prune.data import idx  # pylint: disable=g-import-not-at-top
    from graph_prune.zoo import gap_scratch  # pylint: disable=g-import-not-at-top
    x, y = idx.load_split(idx.FASHION_MNIST_DIR, "train")
    x_test, y_test = idx.load_split(idx.FASHION_MNIST_DIR, "test")
    for run in gap_scratch.RUNS:
      r = gap_scratch.train_run(run, x[:3000], y[:3000], x_test[:500], y_test[:500], 0.75,
                                steps=40, batch_size=32, learning_rate=3e-3, seed=0, parts=3,
                                phase_steps=10, dense_fraction=0.5)
      self.assertEqual(r["widths"], [8, 8, 16, 16, 32, 32])
      if run == "gap":
        grown = [tuple(e["grown"]) for e in r["events"]]
        self.assertLen(grown, 3)   # 40 steps / 10 - 1: the last phase at target widths
        self.assertLen(set(grown), 3)
      real = gap_scratch.pruned_for_real(r["model"], 0.75, self.create_tempdir().full_path)
      self.assertEqual(real["widths_pruned"], [8, 8, 16, 16, 32, 32])
      self.assertLess(real["verify_max_rel_diff"], 1e-4)
      self.assertEqual(real["params_pruned"], 18402)


if __name__ == "__main__":
  absltest.main()
