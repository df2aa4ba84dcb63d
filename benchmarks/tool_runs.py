"""What the benchmarks that drive the command-line tools share: running a tool
as its own process (timed, file to file) and the //tools:prune flags of each
pruning method they compare."""

import os
import subprocess
import sys
import time

from graph_prune.criteria import importance

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_ENV = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3")

# The built-in models (frozen GraphDefs), by the name the benchmarks' --models take.
BUILT_IN = {"default": os.path.join(ROOT, "models", "default", "fmnist_vgg_bn.pb"),
            "resnet": os.path.join(ROOT, "models", "resnet", "fmnist_resnet_bn.pb")}


def model_source(model: str) -> tuple[str, str]:
  """A --models entry's file and row name: a built-in model by name, else a path."""
  if model in BUILT_IN:
    return BUILT_IN[model], model
  return model, os.path.splitext(os.path.basename(model))[0]


# What --mode=mixed measures its candidates on for the built-in models: unlabelled
# Fashion-MNIST training images (the command's --scale=1/255 applies).
FASHION_MNIST_CALIBRATION = ("--calibration_data=fashion-mnist:train",
                             "--calibration_samples=1000", "--calibration_holdout=500")

# Filter allocations (--allocation), layer removal, and layers with filters
# (--mode=mixed, its filters allocated uniformly or by the latency model).
METHODS = ("uniform", "global", "latency", "layer", "mixed", "mixed_latency")


def run(tool: str, *args) -> tuple[float, subprocess.CompletedProcess]:
  """//tools:<tool> with these flags in a process of its own: wall seconds, result."""
  cmd = [sys.executable, os.path.join(ROOT, "tools", f"{tool}.py"), *args]
  t0 = time.perf_counter()
  res = subprocess.run(cmd, capture_output=True, text=True, env=_ENV, check=False)
  return time.perf_counter() - t0, res


def last_line(res: subprocess.CompletedProcess) -> str:
  """A failed tool's one-line error (its last line on stderr)."""
  lines = res.stderr.strip().splitlines()
  return lines[-1] if lines else f"exit {res.returncode}"


def method_flags(method: str, calibration, criterion: str = "l1") -> list[str]:
  """//tools:prune's flags for a method and a criterion; `calibration` are the
  --calibration_* flags that --mode=mixed chooses its candidate on (the output
  error on those samples) and a calibrated criterion scores on."""
  if method not in METHODS:
    raise ValueError(f"unknown method {method!r}; one of {', '.join(METHODS)}")
  if method == "layer":
    flags = ["--mode=layer"]
  elif method.startswith("mixed"):
    flags = ["--mode=mixed",
             "--allocation=" + ("latency" if method == "mixed_latency" else "uniform")]
  else:
    flags = [f"--allocation={method}"]
  flags.append(f"--criterion={criterion}")
  if method.startswith("mixed") or criterion in importance.CALIBRATED:
    flags.extend(calibration)
  return flags
