"""Top-k accuracy and agreement between two models, accumulated batch by batch (numpy only)."""

from __future__ import annotations

import dataclasses

import numpy as np


def label_ranks(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """Where each label stands in its row of scores sorted best first.

  Ties go to the lower class index, as argmax breaks them, so that rank 0 is
  exactly argmax == label. A NaN score for the label ranks last.
  """
  n, k = scores.shape
  own = scores[np.arange(n), labels][:, None]
  before = (scores > own) | ((scores == own) & (np.arange(k)[None, :] < labels[:, None]))
  ranks = before.sum(axis=1)
  return np.where(np.isnan(own[:, 0]), k, ranks)


def _log_softmax(x: np.ndarray) -> np.ndarray:
  x = x.astype(np.float64)
  x = x - x.max(axis=1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


@dataclasses.dataclass(frozen=True)
class Accuracy:
  samples: int
  top1: float
  top5: float
  k: int   # the k of "top-5": 5, or the number of classes if that is fewer


@dataclasses.dataclass(frozen=True)
class Agreement:
  top1: float          # fraction of samples where both models predict the same class
  mean_kl: float       # mean KL(softmax(reference) || softmax(model)), in nats
  max_abs_diff: float  # largest |model output - reference output|


class AccuracyCounter:
  """Counts top-1 and top-5 hits over batches."""

  def __init__(self):
    self._n = self._top1 = self._top5 = 0
    self._k = 5

  def add(self, scores: np.ndarray, labels: np.ndarray) -> None:
    ranks = label_ranks(scores, labels)
    self._k = min(5, scores.shape[1])
    self._n += len(labels)
    self._top1 += int((ranks == 0).sum())
    self._top5 += int((ranks < self._k).sum())  # a NaN ranks K: never a hit

  def result(self) -> Accuracy:
    n = max(self._n, 1)
    return Accuracy(self._n, self._top1 / n, self._top5 / n, self._k)


class AgreementCounter:
  """Compares a model's outputs with a reference model's, batch by batch."""

  def __init__(self):
    self._n = self._same = 0
    self._kl = 0.0
    self._max_diff = 0.0

  def add(self, model: np.ndarray, reference: np.ndarray) -> None:
    self._n += len(model)
    self._same += int((model.argmax(axis=1) == reference.argmax(axis=1)).sum())
    log_m, log_r = _log_softmax(model), _log_softmax(reference)
    self._kl += float((np.exp(log_r) * (log_r - log_m)).sum())
    diff = np.abs(model.astype(np.float64) - reference.astype(np.float64))
    self._max_diff = max(self._max_diff, float(diff.max(initial=0.0)))

  def result(self) -> Agreement:
    n = max(self._n, 1)
    return Agreement(self._same / n, max(self._kl / n, 0.0), self._max_diff)
