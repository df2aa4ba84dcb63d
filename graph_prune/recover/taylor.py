"""The first-order Taylor criterion (TensorFlow: it needs gradients).

The importance of a filter is the loss change that zeroing it would cause, to
first order: sum over the filter of weight x gradient. At the unpruned model
the distillation loss against itself is zero with a zero gradient, so the loss
here is its hard form, the cross-entropy against the original's own top-1 on
each calibration sample (no labels needed). Per batch the first-order terms
are squared and summed over batches (Molchanov et al., 2019), so that filters
whose removal moves the loss either way rank high.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from graph_prune.adapters import tf_model
from graph_prune.adapters import tf_trainable

tf = tf_model.tf


def filter_scores(model: tf_model.TFModel, weights: Sequence[tuple[str, int]],
                  samples: np.ndarray, batch_size: int = 64) -> dict[str, np.ndarray]:
  """weight constant -> one score per output channel (along the given axis)."""
  names = sorted({w for w, _ in weights})
  axes = dict(weights)
  trainable = tf_trainable.Trainable(model, trainable=names)
  logits_name = tf_trainable.logits_tensor(model)
  scores = {n: None for n in names}
  # The weights do not change while they are scored: converted once, not per batch.
  values = {n: np.asarray(v, np.float64) for n, v in trainable.values().items()}
  for start in range(0, len(samples), batch_size):
    x = tf.constant(samples[start:start + batch_size])
    with tf.GradientTape() as tape:
      logits = trainable(x, fetches=[logits_name])[0]
      logits = tf.reshape(logits, [tf.shape(logits)[0], -1])
      labels = tf.stop_gradient(tf.argmax(logits, axis=-1))
      loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits))
    grads = tape.gradient(loss, trainable.weights)
    for name, g in zip(trainable.weight_names, grads):
      if g is None:
        continue
      term = values[name] * np.asarray(g, np.float64)
      axis = axes[name] % term.ndim
      per = np.square(np.moveaxis(term, axis, 0).reshape(term.shape[axis], -1).sum(axis=1))
      scores[name] = per if scores[name] is None else scores[name] + per
  return {n: s for n, s in scores.items() if s is not None}
