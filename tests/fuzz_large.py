"""A large fuzzing run (tests/fuzz_models.py), each case in a worker process with
a timeout, so that a hang or a crash of the runtime is caught too:

  bazel run //tests:fuzz_large -- --cases=1000 --jobs=2 --report=/tmp/fuzz.jsonl

Prints counts per seed model, mutation and status, and every failure as a JSON
case (re-run one with --case='{...}'). Exit status 1 if any case failed.
"""

import collections
import json
import sys
import tempfile
import time

from absl import app
from absl import flags

from tests import fuzz_models
from tests import workers

_CASES = flags.DEFINE_integer("cases", 1000, "Number of cases.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed the cases are drawn from.")
_JOBS = flags.DEFINE_integer("jobs", 2, "Worker processes.")
_TIMEOUT = flags.DEFINE_float("timeout", 120.0, "Seconds per case before it counts as a hang.")
_REPORT = flags.DEFINE_string("report", None, "Write one JSON line per case here.")
_CASE = flags.DEFINE_string("case", None, "Run this one case (JSON) and print the result.")


def _run(text):
  with tempfile.TemporaryDirectory() as tmp:
    return fuzz_models.run(fuzz_models.from_json(text), tmp)


def main(argv):
  del argv
  if _CASE.value:
    status, detail = _run(_CASE.value)
    print(status, detail)
    return 1 if status == "failed" else 0
  texts = [fuzz_models.to_json(c) for c in fuzz_models.cases(_SEED.value, _CASES.value)]
  stats, by_mutation, failures = collections.Counter(), collections.Counter(), []
  report = open(_REPORT.value, "w", encoding="utf-8") if _REPORT.value else None
  start = time.time()
  results = workers.run(_run, texts, _JOBS.value, _TIMEOUT.value,
                        on_hang=lambda _: ("failed", "timed out"),
                        on_crash=lambda _: ("failed", "the worker process died"))
  for finished, (index, (status, detail)) in enumerate(results, 1):
    case = json.loads(texts[index])
    stats[(case["seed_model"], status)] += 1
    by_mutation[(case["mutation"], status)] += 1
    if report:
      report.write(json.dumps({"case": case, "status": status, "detail": detail}) + "\n")
      report.flush()
    if status == "failed":
      failures.append(texts[index])
      print(f"FAILED {texts[index]}  {detail}", flush=True)
    if finished % 100 == 0:
      print(f"{finished}/{len(texts)} cases, {time.time() - start:.0f} s", file=sys.stderr,
            flush=True)
  if report:
    report.close()
  print(f"cases: {len(texts)} in {time.time() - start:.0f} s")
  for (seed, status), n in sorted(stats.items()):
    print(f"  {seed:12} {status:8} {n}")
  for (mutation, status), n in sorted(by_mutation.items()):
    print(f"  {mutation:15} {status:8} {n}")
  print(f"failures: {len(failures)}")
  return 1 if failures else 0


if __name__ == "__main__":
  app.run(main)
