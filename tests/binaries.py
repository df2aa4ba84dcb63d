"""The command lines of the tools (//tools:prune, ...), for tests that run them as a
user does. Under `bazel test` that is the Bazel-built binary the test declares in
its data (so the test exercises the target, its deps and its launcher); run
directly (python tests/x_test.py), the tool's source with the repository on
PYTHONPATH."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def command(tool: str) -> list[str]:
  """argv prefix that runs //tools:<tool>."""
  runfiles = os.environ.get("TEST_SRCDIR")
  if runfiles:
    binary = os.path.join(runfiles, os.environ.get("TEST_WORKSPACE", "graph_prune"), "tools",
                          tool)
    if os.path.exists(binary):
      return [binary]
  return [sys.executable, os.path.join(ROOT, "tools", f"{tool}.py")]


def env(**extra: str) -> dict[str, str]:
  """The environment for a tool: the repository importable, TensorFlow quiet."""
  out = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3")
  out.update(extra)
  return out
