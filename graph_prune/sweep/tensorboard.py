"""The sweep's rows as TensorBoard HParams: one TensorBoard run per row (named by
its key) with the row's settings as hyper-parameters and every number of the row
as a metric, so runs can be compared in TensorBoard's HParams dashboard
(`tensorboard --logdir OUT_DIR/tensorboard`). Rewritten from the rows after each
sweep, like the plots, so a resumed sweep has each run exactly once."""

from __future__ import annotations

import math
import os
import shutil
from typing import Any, Sequence

HPARAMS = ("ratio", "criterion", "round_to", "round_to_used", "quantize", "reconstruct_method",
           "recover_method", "recover_train_steps")
_NOT_METRICS = frozenset(HPARAMS) | {"key", "model", "status", "error", "finished_at", "device",
                                     "device_name", "runtime", "xla"}


def _number(value: Any) -> bool:
  return (isinstance(value, (int, float)) and not isinstance(value, bool) and
          math.isfinite(value))


def write_all(rows: Sequence[dict], out_dir: str) -> str:
  """Writes the rows under out_dir (replacing what was there); returns out_dir."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from tensorboard.plugins.hparams import api as hp  # pylint: disable=g-import-not-at-top
  shutil.rmtree(out_dir, ignore_errors=True)
  metrics = sorted({k for r in rows for k, v in r.items()
                    if k not in _NOT_METRICS and _number(v)})
  names = [h for h in HPARAMS if any(r.get(h) is not None for r in rows)]
  with tf.summary.create_file_writer(out_dir).as_default():
    hp.hparams_config(hparams=[hp.HParam(n) for n in names],
                      metrics=[hp.Metric(m) for m in metrics])
  for row in rows:
    writer = tf.summary.create_file_writer(os.path.join(out_dir, row["key"]))
    with writer.as_default():
      hp.hparams({n: row[n] for n in names if row.get(n) is not None}, trial_id=row["key"])
      for m in metrics:
        if _number(row.get(m)):
          tf.summary.scalar(m, float(row[m]), step=0)
    writer.close()
  return out_dir
