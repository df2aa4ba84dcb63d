"""What a sweep is: its settings, the list flags that make them, its runs and keys,
and the definition that a resume must match (see sweep.py)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import tempfile
from typing import Any, Optional, Sequence, Union

from graph_prune import errors
from graph_prune.bench import benchmark
from graph_prune.bench import runners
from graph_prune.bench import timing
from graph_prune.criteria import allocation as allocation_lib
from graph_prune.criteria import importance

AUTO = "auto"
MODELS_DIR = "models"

RoundTo = Union[int, str]   # a multiple, or "auto"


@dataclasses.dataclass(frozen=True)
class Data:
  """Labelled data for the accuracy columns, as graph_prune.evaluate reads it."""
  spec: str                                  # .npz, TFRecord, folder, IDX, fashion-mnist:SPLIT
  data_format: str = "auto"
  data_dir: Optional[str] = None             # Fashion-MNIST IDX directory
  split: str = "test"
  resize: Optional[tuple[int, int]] = None
  scale: float = 1.0
  mean: tuple[float, ...] = ()
  std: tuple[float, ...] = ()
  max_samples: int = 0                       # 0: all
  batch_size: int = 256


@dataclasses.dataclass(frozen=True)
class Config:
  model: str
  out_dir: str
  ratios: tuple[float, ...]
  criteria: tuple[str, ...]
  round_to: tuple[RoundTo, ...] = (1,)
  batch_sizes: tuple[int, ...] = (1,)
  device: str = "auto"
  xla: bool = True
  timing: timing.Settings = timing.Settings()
  memory: bool = True
  memory_runs: int = 3
  seed: int = 0
  tolerance: float = 1e-4
  signature: Optional[str] = None
  inputs: tuple[str, ...] = ()
  outputs: tuple[str, ...] = ()
  data: Optional[Data] = None
  keep_models: bool = True
  widths_cache: Optional[str] = None         # for round_to "auto" (default: user cache)
  overwrite: bool = False
  # Reconstruction after pruning (reconstruct.Options) and the calibration samples
  # (calibration.samples.Spec) it and the calibrated criteria read.
  reconstruct: Any = None
  calibration: Any = None
  taylor: Any = None   # the taylor criterion's gradient code (pipeline.Options.taylor)
  # Quantization schemes, one run each ("none": not quantized), ONNX models only;
  # the int8 calibration method and the agreement threshold of //tools:prune.
  quantize: tuple[str, ...] = ("none",)
  quantize_calibration: str = "minmax"
  min_agreement: float = 0.99
  # How kept counts are chosen, one run each (criteria/allocation.py); and measured
  # speedup budgets, which replace the ratios (one run each, timed by `latency`
  # at the first batch size: a bench.latency.Probe the tool builds).
  allocations: tuple[str, ...] = ("uniform",)
  target_speedups: tuple[float, ...] = ()
  latency: Any = None

  @property
  def budgeted(self) -> bool:
    """Whether the sweep has the allocation or budget dimensions (their columns)."""
    return self.allocations != ("uniform",) or bool(self.target_speedups)


@dataclasses.dataclass(frozen=True)
class RunSpec:
  key: str
  ratio: float
  criterion: str
  round_to: RoundTo          # as requested
  quantize: str = "none"
  allocation: str = "uniform"
  target_speedup: Optional[float] = None   # a budget instead of the ratio


# --- parsing of list flags --------------------------------------------------------


def _number(text: str, flag: str) -> float:
  try:
    value = float(text)
  except ValueError:
    raise errors.UsageError(f"{flag}: '{text}' is not a number; give e.g. "
                            f"{flag}=0.1,0.2,...,0.9") from None
  if not math.isfinite(value):
    raise errors.UsageError(f"{flag}: '{text}' is not a finite number")
  return value


def parse_ratios(values: Sequence[str], flag: str = "--ratios") -> tuple[float, ...]:
  """'0.1', '0.2', '...', '0.9' -> (0.1, 0.2, ..., 0.9): '...' continues the step of
  the two values before it up to the value after it."""
  tokens = [str(v).strip() for v in values if str(v).strip()]
  out: list[float] = []
  i = 0
  while i < len(tokens):
    t = tokens[i]
    if t == "...":
      if len(out) < 2 or i + 1 >= len(tokens) or tokens[i + 1] == "...":
        raise errors.UsageError(f"{flag}: '...' needs two values before it and one after, "
                                f"e.g. {flag}=0.1,0.2,...,0.9")
      step, end = out[-1] - out[-2], _number(tokens[i + 1], flag)
      count = (end - out[-1]) / step if step else -1.0
      if step <= 0 or count < 1 - 1e-9 or abs(count - round(count)) > 1e-6:
        raise errors.UsageError(f"{flag}: {end:g} is not reached from {out[-2]:g}, {out[-1]:g} "
                                "in equal increasing steps")
      first = out[-1]
      out += [round(first + k * step, 10) for k in range(1, int(round(count)) + 1)]
      i += 2
      continue
    out.append(round(_number(t, flag), 10))
    i += 1
  if not out:
    raise errors.UsageError(f"{flag} is empty; give e.g. {flag}=0.1,0.2,...,0.9")
  for r in out:
    if not 0.0 <= r < 1.0:
      raise errors.UsageError(f"{flag}: ratio {r:g} is outside [0, 1)")
  _no_repeats(out, flag)
  return tuple(out)


def _choices(values: Sequence[str], known: Sequence[str], flag: str, what: str
             ) -> tuple[str, ...]:
  """The listed names, each one of `known`, none twice (may be empty)."""
  out = tuple(str(v).strip() for v in values if str(v).strip())
  for c in out:
    if c not in known:
      raise errors.UsageError(f"{flag}: unknown {what} '{c}'; choose from {', '.join(known)}")
  _no_repeats(out, flag)
  return out


def parse_criteria(values: Sequence[str]) -> tuple[str, ...]:
  out = _choices(values, importance.CRITERIA, "--criteria", "criterion")
  if not out:
    raise errors.UsageError(f"--criteria is empty; choose from {', '.join(importance.CRITERIA)}")
  return out


def parse_round_to(values: Sequence[str]) -> tuple[RoundTo, ...]:
  out: list[RoundTo] = []
  for v in (str(v).strip() for v in values if str(v).strip()):
    if v == AUTO:
      out.append(AUTO)
    elif v.isdecimal() and int(v) >= 1:
      out.append(int(v))
    else:
      raise errors.UsageError(f"--round_to: '{v}' is not a positive integer or 'auto'; give "
                              "e.g. --round_to=1,auto")
  if not out:
    raise errors.UsageError("--round_to is empty; give e.g. --round_to=1,auto")
  _no_repeats(out, "--round_to")
  return tuple(out)


def _no_repeats(values: Sequence[Any], flag: str) -> None:
  seen = set()
  for v in values:
    if v in seen:
      raise errors.UsageError(f"{flag}: {v} is listed twice")
    seen.add(v)


# --- the runs and the sweep's files --------------------------------------------


def key_of(ratio: float, criterion: str, round_to: RoundTo, quantize: str = "none",
           allocation: str = "uniform", target_speedup: Optional[float] = None) -> str:
  head = f"s{target_speedup:.10g}" if target_speedup is not None else f"r{ratio:.10g}"
  return (f"{head}_{criterion}_rt{round_to}" +
          (f"_a{allocation}" if allocation != "uniform" else "") +
          (f"_q{quantize}" if quantize != "none" else ""))


def plan_runs(config: Config) -> list[RunSpec]:
  """Every run in order: ratio (or target speedup), then criterion, then round_to,
  then allocation, then quantization."""
  points = ([(0.0, s) for s in config.target_speedups] if config.target_speedups
            else [(r, None) for r in config.ratios])
  return [RunSpec(key_of(r, c, t, q, a, s), r, c, t, q, a, s)
          for r, s in points for c in config.criteria for t in config.round_to
          for a in config.allocations for q in config.quantize]


def parse_allocations(values: Sequence[str]) -> tuple[str, ...]:
  """'uniform,latency' -> ('uniform', 'latency'), each one known."""
  return _choices(values, allocation_lib.ALLOCATIONS, "--allocations", "allocation") or (
      "uniform",)


def parse_target_speedups(values: Sequence[str]) -> tuple[float, ...]:
  """'1.5,2,3' -> (1.5, 2.0, 3.0): measured speedups, each above 1."""
  out = tuple(_number(str(v).strip(), "--target_speedups") for v in values if str(v).strip())
  for v in out:
    if v <= 1:
      raise errors.UsageError(f"--target_speedups: {v:g} is not above 1; give e.g. "
                              "--target_speedups=1.5,2,3")
  _no_repeats(out, "--target_speedups")
  return out


def parse_quantize(values: Sequence[str]) -> tuple[str, ...]:
  """'none,int8,codebook4' -> ('none', 'int8', 'codebook4'), each scheme checked."""
  out = tuple(str(v).strip() for v in values if str(v).strip()) or ("none",)
  _no_repeats(out, "--quantize")
  from graph_prune.quantize import options as quantize_options  # pylint: disable=g-import-not-at-top
  for q in out:
    if q != "none":
      quantize_options.check(quantize_options.Options(q))
  return out


def model_name(path: str) -> str:
  base = os.path.basename(os.path.normpath(path))
  for ext in (".onnx", ".pbtxt", ".pb"):
    if base.endswith(ext):
      return base[:-len(ext)]
  return base


def model_path(config: Config, key: str) -> str:
  """Where the run's pruned model goes: the input's format, by extension."""
  m = config.model.rstrip("/")
  if os.path.isdir(m):
    ext = ".savedmodel"
  else:
    ext = next((e for e in (".onnx", ".pbtxt") if m.endswith(e)), ".pb")
  return os.path.join(config.out_dir, MODELS_DIR, key + ext)


def fingerprint(path: str) -> str:
  """sha256 of a model file, or of a directory's files (relative names and bytes)."""
  h = hashlib.sha256()
  if os.path.isdir(path):
    for root, dirs, files in os.walk(path):
      dirs.sort()
      for name in sorted(files):
        full = os.path.join(root, name)
        h.update(os.path.relpath(full, path).encode() + b"\0")
        _hash_file(h, full)
  else:
    _hash_file(h, path)
  return h.hexdigest()


def _hash_file(h, path: str) -> None:
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)


def definition(config: Config, step_names: Sequence[str] = ()) -> dict[str, Any]:
  """The settings that make a sweep what it is, JSON-ready."""
  return json.loads(json.dumps({
      "model": os.path.abspath(config.model), "model_sha256": fingerprint(config.model),
      "ratios": list(config.ratios), "criteria": list(config.criteria),
      "round_to": list(config.round_to), "batch_sizes": list(config.batch_sizes),
      "device": config.device, "xla": config.xla, "memory": config.memory, "seed": config.seed,
      "tolerance": config.tolerance, "signature": config.signature,
      "inputs": list(config.inputs), "outputs": list(config.outputs),
      "data": dataclasses.asdict(config.data) if config.data else None,
      "reconstruct": dataclasses.asdict(config.reconstruct) if config.reconstruct else None,
      "calibration": dataclasses.asdict(config.calibration) if config.calibration else None,
      "steps": list(step_names),
      # Only where quantized, so that sweeps from before keep their definition.
      **({"quantize": list(config.quantize), "quantize_calibration": config.quantize_calibration,
          "min_agreement": config.min_agreement} if config.quantize != ("none",) else {}),
      # Likewise only with allocations or budgets.
      **({"allocations": list(config.allocations),
          "target_speedups": list(config.target_speedups),
          "latency": config.latency.describe() if config.latency else None}
         if config.budgeted else {}),
  }))


def check(config: Config) -> None:
  """Cheap checks before any framework import."""
  if not os.path.exists(config.model):
    raise errors.InputError(f"--in '{config.model}' does not exist; give a .pb/.pbtxt "
                            "GraphDef, a SavedModel directory or an .onnx file")
  if not config.ratios or not config.criteria or not config.round_to:
    raise errors.UsageError("a sweep needs at least one ratio, criterion and round_to")
  parse_ratios([str(r) for r in config.ratios])
  parse_criteria(config.criteria)
  calibrated = [c for c in config.criteria if c in importance.CALIBRATED]
  if (calibrated or config.reconstruct) and config.calibration is None:
    what = ", ".join(calibrated + (["--reconstruct"] if config.reconstruct else []))
    raise errors.UsageError(f"{what}: give --calibration_data (unlabelled samples)")
  parse_round_to([str(t) for t in config.round_to])
  parse_allocations(config.allocations)
  parse_target_speedups([str(t) for t in config.target_speedups])
  if "latency" in config.allocations and not config.target_speedups:
    raise errors.UsageError("--allocations=latency allocates for a measured budget: give "
                            "--target_speedups (which replace --ratios)")
  if config.target_speedups and config.latency is None:
    raise errors.UsageError("--target_speedups: no timing probe handed in (Config.latency)")
  quantized = [q for q in parse_quantize(config.quantize) if q != "none"]
  if quantized and not config.model.endswith(".onnx"):
    raise errors.UsageError("--quantize in a sweep quantizes ONNX models (benchmarked against "
                            "the float original in ONNX Runtime); convert the TensorFlow model "
                            "first: //tools:prune --ratio=0 --out_format=onnx")
  if quantized and config.calibration is None:
    raise errors.UsageError(f"--quantize={','.join(quantized)}: give --calibration_data "
                            "(unlabelled samples)")
  benchmark.parse_batch_sizes([str(b) for b in config.batch_sizes])
  runners.check_device(config.device)
  if config.memory_runs < 0:
    raise errors.UsageError("--memory_runs must be >= 0")
  if not 0 < config.tolerance:
    raise errors.UsageError("--tolerance must be positive")
  _check_out_dir(config.out_dir)


def _check_out_dir(out_dir: str) -> None:
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise errors.UsageError(f"--out_dir '{out_dir}' is a file; give a directory")
  try:
    os.makedirs(out_dir, exist_ok=True)
    fd, probe = tempfile.mkstemp(prefix=".gp_probe_", dir=out_dir)
    os.close(fd)
    os.remove(probe)
  except OSError as e:
    raise errors.UsageError(f"--out_dir '{out_dir}' is not a writable directory "
                            f"({e.strerror or e}); choose another") from None
