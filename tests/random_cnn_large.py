"""A large run of the random-CNN properties (tests/random_cnn.py), in worker
processes that time each case out:

  bazel run //tests:random_cnn_large -- --cases=5000 --jobs=2 --report=/tmp/rc.jsonl

Prints a summary (cases per format and status, blocks built, time) and every
failure as a JSON case that re-runs it: --case='{...}'. Exit status 1 if any
case failed.
"""

import collections
import json
import sys
import tempfile
import time

from absl import app
from absl import flags

from tests import random_cnn
from tests import workers

_CASES = flags.DEFINE_integer("cases", 1000, "Number of cases.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed the cases are drawn from.")
_FORMATS = flags.DEFINE_list("formats", ["onnx", "onnx", "onnx", "tf"],
                             "Formats, cycled over the cases (repeat one to weigh it).")
_JOBS = flags.DEFINE_integer("jobs", 2, "Worker processes.")
_TIMEOUT = flags.DEFINE_float("timeout", 120.0, "Seconds per case before it counts as a hang.")
_REPORT = flags.DEFINE_string("report", None, "Write one JSON line per case here.")
_CASE = flags.DEFINE_string("case", None, "Run this one case (JSON) and print the result.")


def _run(text):
  with tempfile.TemporaryDirectory() as tmp:
    result = random_cnn.run(random_cnn.from_json(text), tmp)
  return result.status, result.detail, result.groups, list(result.blocks)


def main(argv):
  del argv
  if _CASE.value:
    with tempfile.TemporaryDirectory() as tmp:
      result = random_cnn.run(random_cnn.from_json(_CASE.value), tmp)
    print(result.status, list(result.blocks), result.detail)
    return 0 if result.status != "failed" else 1
  all_cases = random_cnn.cases(_SEED.value, _CASES.value, tuple(_FORMATS.value))
  stats, blocks, failures = collections.Counter(), collections.Counter(), []
  report = open(_REPORT.value, "w", encoding="utf-8") if _REPORT.value else None
  start = time.time()
  texts = [random_cnn.to_json(c) for c in all_cases]
  results = workers.run(_run, texts, _JOBS.value, _TIMEOUT.value,
                        on_hang=lambda _: ("failed", "timed out", 0, []),
                        on_crash=lambda _: ("failed", "the worker process died", 0, []))
  for finished, (index, (status, detail, groups, built)) in enumerate(results, 1):
    case = all_cases[index]
    stats[(case.fmt, status)] += 1
    blocks.update(built)
    line = {"case": json.loads(texts[index]), "status": status, "detail": detail,
            "groups_pruned": groups, "blocks": built}
    if report:
      report.write(json.dumps(line) + "\n")
      report.flush()
    if status == "failed":
      failures.append(line)
      print(f"FAILED {texts[index]}  blocks={built}  {detail}", flush=True)
    if finished % 100 == 0:
      print(f"{finished}/{len(all_cases)} cases, {time.time() - start:.0f} s", file=sys.stderr,
            flush=True)
  if report:
    report.close()
  print(f"cases: {len(all_cases)} in {time.time() - start:.0f} s")
  for (fmt, status), n in sorted(stats.items()):
    print(f"  {fmt:5} {status:8} {n}")
  print("blocks built: " + ", ".join(f"{k} {v}" for k, v in sorted(blocks.items())))
  print(f"failures: {len(failures)}")
  return 1 if failures else 0


if __name__ == "__main__":
  app.run(main)
