"""The A/B timing loop and its statistics; no framework imports. Every benchmark
of the project times through measure().

Models are called once each per round, so that slow drifts of the machine (other
processes, clock changes, thermal limits) hit every model alike; the order within
each round is shuffled (seeded), because a fixed order favours one position (a
model timed against an identical copy looked 1.35x faster in second place). The
speedup of one model over another is the ratio of their times within each round,
summarised over the rounds.

The loop stops when every model's median latency (and, with two models, the
median ratio) is known to `target_rse` relative standard error, or when the
time budget is spent; `min_runs` rounds always run.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from typing import Callable, Optional, Sequence

from absl import logging

# z for a 95 % interval: the distribution-free interval of the median spans
# ranks n/2 -+ z*sqrt(n)/2, which is about +-2 standard errors.
_Z = 1.96


@dataclasses.dataclass(frozen=True)
class Settings:
  warmup: int = 2             # untimed calls per model before the loop
  min_runs: int = 5           # rounds that always run
  max_runs: int = 100_000     # rounds at most (bounds memory for microsecond models)
  max_seconds: float = 10.0   # time budget per model: the loop stops after models x this
  target_rse: float = 0.01    # relative standard error of the medians that ends the loop
  seed: int = 0               # of the order within each round

  def __post_init__(self):
    if self.warmup < 0 or self.min_runs < 1 or self.max_runs < self.min_runs:
      raise ValueError("need warmup >= 0 and 1 <= min_runs <= max_runs")
    if self.max_seconds <= 0 or self.target_rse <= 0:
      raise ValueError("max_seconds and target_rse must be positive")


@dataclasses.dataclass(frozen=True)
class Summary:
  median: float
  p10: float
  p90: float
  rse: float    # relative standard error of the median
  n: int

  def to_json(self, scale: float = 1.0) -> dict:
    return {"median": self.median * scale, "p10": self.p10 * scale, "p90": self.p90 * scale,
            "rse": self.rse, "n": self.n}


@dataclasses.dataclass(frozen=True)
class Result:
  """Seconds per call for each model, and per-round ratios times[0] / times[i]."""
  times: tuple[tuple[float, ...], ...]
  ratios: tuple[tuple[float, ...], ...]   # ratios[i-1] is times[0] / times[i], i >= 1
  converged: bool
  elapsed_s: float


def percentile(values: Sequence[float], q: float) -> float:
  """Linear interpolation between closest ranks (numpy's default method)."""
  if not values:
    raise ValueError("percentile of no values")
  xs = sorted(values)
  pos = (len(xs) - 1) * q / 100.0
  lo = math.floor(pos)
  hi = min(lo + 1, len(xs) - 1)
  return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def median_rse(values: Sequence[float]) -> float:
  """Relative standard error of the median, distribution-free: half the width of
  the order-statistic interval around the median, over 2 z, over the median.
  Infinite for fewer than 3 values (no interval yet)."""
  n = len(values)
  if n < 3:
    return math.inf
  xs = sorted(values)
  half = _Z * math.sqrt(n) / 2
  lo = max(0, math.floor(n / 2 - half))
  hi = min(n - 1, math.ceil(n / 2 + half) - 1)
  med = percentile(xs, 50)
  if med == 0:
    return math.inf
  return (xs[hi] - xs[lo]) / (2 * _Z) / abs(med)


def summarise(values: Sequence[float]) -> Summary:
  return Summary(percentile(values, 50), percentile(values, 10), percentile(values, 90),
                 median_rse(values), len(values))


def measure(calls: Sequence[Callable[[], object]], settings: Settings,
            label: str = "", clock: Callable[[], float] = time.perf_counter) -> Result:
  """Times the calls one of each per round, in a shuffled order each round.

  Each call must return only when its work is done (device work synchronised).
  """
  if not calls:
    raise ValueError("nothing to time")
  for call in calls:
    for _ in range(settings.warmup):
      call()
  times: list[list[float]] = [[] for _ in calls]
  budget = settings.max_seconds * len(calls)
  start = last_log = clock()
  next_check, converged = settings.min_runs, False
  rounds = 0
  order = list(range(len(calls)))
  shuffle = random.Random(settings.seed).shuffle
  while rounds < settings.max_runs:
    shuffle(order)
    for i in order:
      t0 = clock()
      calls[i]()
      times[i].append(clock() - t0)
    rounds += 1
    now = clock()
    if rounds >= next_check:
      converged = _converged(times, settings.target_rse)
      if converged:
        break
      # Checking costs a sort: do it at geometrically spaced rounds.
      next_check = max(rounds + 1, int(rounds * 1.1))
    if now - start >= budget and rounds >= settings.min_runs:
      break
    if now - last_log >= 5.0:
      last_log = now
      logging.info("%s: %d rounds, medians %s ms", label, rounds,
                   " / ".join(f"{percentile(t, 50) * 1e3:.3g}" for t in times))
  elapsed = clock() - start
  if rounds >= settings.min_runs and not converged:
    converged = _converged(times, settings.target_rse)
  return Result(tuple(tuple(t) for t in times), tuple(_ratios(times)), converged, elapsed)


def _ratios(times: Sequence[Sequence[float]]) -> list[tuple[float, ...]]:
  return [tuple(a / b if b > 0 else math.inf for a, b in zip(times[0], t)) for t in times[1:]]


def _converged(times: Sequence[Sequence[float]], target: float) -> bool:
  if any(median_rse(t) >= target for t in times):
    return False
  return all(median_rse(r) < target for r in _ratios(times))


def speedup(result: Result, index: int = 1) -> Optional[Summary]:
  """Per-round ratio times[0] / times[index] summarised; None with one model."""
  if index < 1 or index > len(result.ratios):
    return None
  return summarise(result.ratios[index - 1])
