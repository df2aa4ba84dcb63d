"""A pool of worker processes for long test runs: each case runs in a worker
(spawned, so TensorFlow's threads never meet fork), a case that runs past its
timeout or kills its worker is reported as such and the worker replaced."""

import multiprocessing
import queue
import time
from typing import Callable, Iterator, Sequence


def _loop(fn, todo, done):
  for index, item in iter(todo.get, None):
    done.put((index, fn(item)))


class _Worker:

  def __init__(self, ctx, fn):
    self.todo, self.done = ctx.Queue(), ctx.Queue()
    self.proc = ctx.Process(target=_loop, args=(fn, self.todo, self.done), daemon=True)
    self.proc.start()
    self.current, self.since = None, 0.0


def run(fn: Callable, items: Sequence, jobs: int, timeout: float,
        on_hang: Callable, on_crash: Callable) -> Iterator[tuple[int, object]]:
  """Yields (index, fn(item)) as cases finish, in any order. `fn` must be a
  module-level function (it is pickled into the workers). A case past `timeout`
  seconds yields on_hang(item); one whose worker died yields on_crash(item)."""
  ctx = multiprocessing.get_context("spawn")
  workers = [_Worker(ctx, fn) for _ in range(max(1, jobs))]
  pending = list(range(len(items)))[::-1]
  left = len(items)
  try:
    while left:
      for i, w in enumerate(workers):
        if w.current is None:
          if pending:
            w.current, w.since = pending.pop(), time.time()
            w.todo.put((w.current, items[w.current]))
          continue
        try:
          index, result = w.done.get(timeout=0.05)
        except queue.Empty:
          dead = not w.proc.is_alive()
          if not dead and time.time() - w.since <= timeout:
            continue
          w.proc.kill()
          index, result = w.current, (on_crash if dead else on_hang)(items[w.current])
          workers[i] = _Worker(ctx, fn)
          w = workers[i]
        w.current = None
        left -= 1
        yield index, result
  finally:
    for w in workers:
      if w.proc.is_alive():
        w.proc.kill()
