"""Callables to time: TensorFlow (XLA or plain) and ONNX Runtime.

Models are read with the format adapters, so that inputs, outputs and
signatures are found exactly as the pruning tool finds them. A TensorFlow
model becomes a concrete function (`wrap_function` + `prune` over its frozen
GraphDef), wrapped in `tf.function(jit_compile=True)` for XLA; an ONNX model
becomes an ONNX Runtime session (CUDA provider where asked for, else CPU).

TensorFlow and onnxruntime are imported only when a model of their kind is
built, so an ONNX benchmark (and its memory child) never pays for TensorFlow.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
from typing import Any, Callable, Optional, Sequence

import numpy as np

from graph_prune import errors
from graph_prune import formats

ONNX = "onnx"
TFLITE = "tflite"
_DEVICE_RE = re.compile(r"^(auto|cpu|gpu|tpu)(?::(\d+))?$")


@dataclasses.dataclass(frozen=True)
class Device:
  kind: str        # "cpu", "gpu" or "tpu"
  index: int = 0

  @property
  def label(self) -> str:
    return f"{self.kind}:{self.index}"

  @property
  def tf_name(self) -> str:
    return f"/{self.kind.upper()}:{self.index}"


@dataclasses.dataclass(frozen=True)
class Loaded:
  """A model as the adapters read it."""
  path: str
  format: str          # "graphdef", "graphdef_text", "saved_model", "onnx" or "tflite"
  model: Any           # tf_model.TFModel, onnx_model.ONNXModel or tflite_model.TFLiteModel


@dataclasses.dataclass(frozen=True)
class Input:
  name: str
  shape: Optional[tuple]   # None: unknown rank; in it None (or, in ONNX, a name): unknown size
  dtype: str


@dataclasses.dataclass(frozen=True)
class Bound:
  """A model bound to fixed inputs of one batch size.

  `call` runs it and returns when the device is done (what is timed); `fetch`
  runs it and returns the outputs as numpy arrays.
  """
  call: Callable[[], None]
  fetch: Callable[[], list]


def check_device(requested: str) -> None:
  """Syntax only (no framework import), so a bad flag fails at once."""
  if not _DEVICE_RE.match(requested or "") or requested.startswith("auto:"):
    raise errors.UsageError(f"unknown device '{requested}'; use auto, cpu, gpu, gpu:N, tpu "
                            "or tpu:N")


def format_of(path: str) -> str:
  return formats.name_of(path)


def load(path: str, signature: Optional[str] = None, inputs: Sequence[str] = (),
         outputs: Sequence[str] = ()) -> Loaded:
  """Reads a model with its format adapter; raises InputError/UsageError on bad input."""
  ref = formats.ModelRef(path, signature, tuple(inputs), tuple(outputs))
  model = ref.load()
  return Loaded(path, ONNX if ref.format.name == formats.ONNX else model.kind, model)


def size_on_disk(loaded: Loaded) -> int:
  """Bytes of the model on disk: the file, a SavedModel directory, or an ONNX file
  with its external data files."""
  path = loaded.path
  if os.path.isdir(path):
    return sum(os.path.getsize(os.path.join(root, f))
               for root, _, files in os.walk(path) for f in files)
  total = os.path.getsize(path)
  if loaded.format == ONNX and loaded.model.external_data:
    import onnx  # pylint: disable=g-import-not-at-top
    proto = onnx.load_model(path, load_external_data=False)
    tensors = list(proto.graph.initializer) + [
        a.t for n in proto.graph.node for a in n.attribute if a.HasField("t")]
    locations = {e.value for t in tensors for e in t.external_data if e.key == "location"}
    base = os.path.dirname(os.path.abspath(path))
    total += sum(os.path.getsize(os.path.join(base, loc)) for loc in sorted(locations)
                 if os.path.isfile(os.path.join(base, loc)))
  return total


def runtime_name(fmt: str, xla: bool) -> str:
  if fmt == ONNX:
    return "onnxruntime"
  if fmt == TFLITE:
    return "litert"
  return "tensorflow-xla" if xla else "tensorflow"


# --- devices -------------------------------------------------------------------


def resolve_device(requested: str, fmt: str) -> Device:
  """The device a model of this format runs on: the one asked for, or with
  'auto' the best present (TPU, GPU, else CPU; ONNX Runtime: CUDA, else CPU)."""
  check_device(requested)
  match = _DEVICE_RE.match(requested)
  kind, index = match.group(1), int(match.group(2) or 0)
  if fmt == ONNX:
    return _resolve_ort(kind, index)
  if fmt == TFLITE:
    if kind not in ("auto", "cpu"):
      raise errors.UsageError(f"--device={requested}: LiteRT models run on the CPU here; use "
                              "--device=cpu")
    return Device("cpu", 0)
  return _resolve_tf(kind, index)


def _resolve_ort(kind: str, index: int) -> Device:
  import onnxruntime  # pylint: disable=g-import-not-at-top
  has_cuda = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
  if kind == "tpu":
    raise errors.UsageError("ONNX Runtime has no TPU provider; use --device=cpu or gpu for "
                            "ONNX models")
  if kind == "gpu" and not has_cuda:
    raise errors.UsageError("--device=gpu: ONNX Runtime has no CUDA provider here "
                            "(install onnxruntime-gpu); use --device=cpu")
  if kind == "auto":
    return Device("gpu") if has_cuda else Device("cpu")
  return Device(kind, index)


def _resolve_tf(kind: str, index: int) -> Device:
  tf = _tf()
  if kind == "tpu" and not tf.config.list_logical_devices("TPU"):
    _init_tpu()
  if kind == "auto":
    if not tf.config.list_logical_devices("TPU") and _tpu_host():
      try:
        _init_tpu()
      except errors.UsageError:
        pass  # TPU device files, but no TPU runtime: take the next best
    if tf.config.list_logical_devices("TPU"):
      return Device("tpu")
    return Device("gpu") if tf.config.list_physical_devices("GPU") else Device("cpu")
  present = (len(tf.config.list_logical_devices("TPU")) if kind == "tpu"
             else len(tf.config.list_physical_devices(kind.upper())))
  if index >= present:
    raise errors.UsageError(f"--device={kind}:{index}: TensorFlow sees {present} "
                            f"{kind.upper()} device(s) here; use --device=auto or cpu")
  return Device(kind, index)


def _tpu_host() -> bool:
  """Whether this host shows TPU chips (TPU VMs: /dev/accel* or /dev/vfio/N);
  TensorFlow lists TPUs only after the TPU system is initialised."""
  tf = _tf()
  return bool(tf.config.list_physical_devices("TPU") or glob.glob("/dev/accel[0-9]*")
              or glob.glob("/dev/vfio/[0-9]*"))


def _init_tpu() -> None:
  """Connects to a TPU on this host (TPU VM); absent TPUs are a usage error."""
  tf = _tf()
  try:
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu="local")
    tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
  except Exception as e:  # pylint: disable=broad-except  # many types when there is no TPU
    raise errors.UsageError(f"--device=tpu: no TPU found ({str(e).splitlines()[0][:120]}); "
                            "use --device=auto or cpu") from None


def describe(device: Device, fmt: str) -> str:
  """A human description of the device (CPU model, GPU name)."""
  if device.kind == "cpu":
    name = ""
    try:
      with open("/proc/cpuinfo", encoding="utf-8") as f:
        found = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M)
      name = found.group(1).strip() if found else ""
    except OSError:
      pass
    return f"{name or 'CPU'} ({os.cpu_count()} logical cores)"
  if device.kind == "gpu" and fmt != ONNX:
    tf = _tf()
    gpus = tf.config.list_physical_devices("GPU")
    details = tf.config.experimental.get_device_details(gpus[device.index])
    return details.get("device_name", device.label)
  return device.label


# --- inputs --------------------------------------------------------------------


def batch_shape(spec: Input, batch: int) -> tuple[int, ...]:
  """The input's shape at this batch size: the first dimension is the batch."""
  if spec.shape is None:
    raise errors.UsageError(f"input '{spec.name}' has an unknown rank; the benchmark needs "
                            "fixed sizes beyond the batch")
  if not spec.shape:
    return ()
  first, rest = spec.shape[0], spec.shape[1:]
  if any(not isinstance(d, int) or d < 0 for d in rest):
    raise errors.UsageError(f"input '{spec.name}' has unknown dimensions beyond the batch "
                            f"({_shape_text(spec.shape)}); the benchmark needs fixed sizes")
  if isinstance(first, int) and first >= 0 and first != batch:
    raise errors.UsageError(f"input '{spec.name}' has a fixed batch size of {first} "
                            f"({_shape_text(spec.shape)}); use --batch_sizes={first}")
  return (batch,) + tuple(rest)


def _shape_text(shape: tuple) -> str:
  return "[" + ", ".join("?" if not isinstance(d, int) or d < 0 else str(d) for d in shape) + "]"


def random_inputs(specs: Sequence[Input], batch: int, seed: int) -> list[np.ndarray]:
  """Seeded inputs: floats uniform in [-1, 1]; integers and booleans zero (a
  valid index or id in any vocabulary)."""
  rng = np.random.default_rng(seed)
  out = []
  for spec in specs:
    shape, dtype = batch_shape(spec, batch), np.dtype(spec.dtype)
    if np.issubdtype(dtype, np.floating):
      out.append(rng.uniform(-1.0, 1.0, shape).astype(dtype))
    else:
      out.append(np.zeros(shape, dtype))
  return out


# --- runners -------------------------------------------------------------------


class TFRunner:
  """The frozen graph as one function on one device, XLA-compiled or plain. With
  feed_weights, the linear layers' large weights are arguments of the function
  (bound once, like a SavedModel's variables) rather than constants: XLA keeps
  every executable it compiles for the life of the process, and one compiled with
  its weights as constants holds several copies of them."""

  def __init__(self, loaded: Loaded, device: Device, xla: bool, feed_weights: bool = False):
    tf = _tf()
    model = loaded.model
    from graph_prune.adapters import tf_model  # pylint: disable=g-import-not-at-top
    graph_def, names, self._weights = model.graph_def, [], []
    if feed_weights:
      graph_def, names, self._weights = tf_model.weights_as_feeds(graph_def)
    pruned, feeds = tf_model.concrete_function(graph_def, list(model.inputs) + names,
                                               model.outputs)
    # jit_compile=None (not False) is plain TensorFlow: grappler, no XLA clustering forced.
    self._fn = tf.function(lambda *args: pruned(*args), jit_compile=True if xla else None)
    self.inputs = tuple(
        Input(t, tuple(f.shape.as_list()) if f.shape.rank is not None else None,
              f.dtype.as_numpy_dtype.__name__ if f.dtype.is_numpy_compatible else "float32")
        for t, f in zip(model.inputs, feeds))
    self.outputs = tuple(model.outputs)
    self.device = device
    self._sync = device.kind != "cpu"

  def bind(self, batch: int, seed: int = 0) -> Bound:
    tf = _tf()
    arrays = random_inputs(self.inputs, batch, seed)
    with tf.device(self.device.tf_name):
      tensors = [tf.identity(tf.constant(a)) for a in [*arrays, *self._weights]]
    fn, name, sync = self._fn, self.device.tf_name, self._sync

    def call():
      with tf.device(name):
        out = fn(*tensors)
      if sync:
        tf.test.experimental.sync_devices()
      return out

    def fetch():
      with tf.device(name):
        return [np.asarray(t) for t in fn(*tensors)]

    return Bound(call, fetch)


class ORTRunner:
  """An ONNX Runtime session on the CPU or one CUDA device."""

  def __init__(self, loaded: Loaded, device: Device):
    import onnxruntime  # pylint: disable=g-import-not-at-top
    self._ort = onnxruntime
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    # Idle worker threads of one session would otherwise spin while the other
    # session of the A/B pair runs, and take its cores.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if device.kind == "gpu":
      providers = [("CUDAExecutionProvider", {"device_id": device.index}), "CPUExecutionProvider"]
    else:
      providers = ["CPUExecutionProvider"]
    self._session = onnxruntime.InferenceSession(
        loaded.model.proto.SerializeToString(), options, providers=providers)
    if device.kind == "gpu" and "CUDAExecutionProvider" not in self._session.get_providers():
      raise errors.UsageError("ONNX Runtime could not start its CUDA provider; use --device=cpu")
    by_name = {i.name: i for i in self._session.get_inputs()}
    for name in loaded.model.inputs:
      if name not in by_name:
        raise errors.UsageError(f"input '{name}' is not a graph input of '{loaded.path}'; "
                                "ONNX Runtime feeds graph inputs only")
    self.inputs = tuple(
        Input(name, tuple(d if isinstance(d, int) else None for d in by_name[name].shape),
              _ORT_TYPES.get(by_name[name].type, "float32"))
        for name in loaded.model.inputs)
    self.outputs = tuple(loaded.model.outputs)
    self.device = device

  def bind(self, batch: int, seed: int = 0) -> Bound:
    arrays = random_inputs(self.inputs, batch, seed)
    session, outputs = self._session, list(self.outputs)
    if self.device.kind != "gpu":
      feeds = {spec.name: a for spec, a in zip(self.inputs, arrays)}
      return Bound(lambda: session.run(outputs, feeds), lambda: session.run(outputs, feeds))
    # Inputs live on the GPU and outputs stay there, so host copies are not timed;
    # Run() synchronises the provider before it returns.
    binding = session.io_binding()
    for spec, a in zip(self.inputs, arrays):
      binding.bind_ortvalue_input(
          spec.name, self._ort.OrtValue.ortvalue_from_numpy(a, "cuda", self.device.index))
    for name in outputs:
      binding.bind_output(name, "cuda", self.device.index)

    def fetch():
      session.run_with_iobinding(binding)
      return binding.copy_outputs_to_cpu()

    return Bound(lambda: session.run_with_iobinding(binding), fetch)


class LiteRTRunner:
  """The LiteRT interpreter on the CPU, one thread per core (as ONNX Runtime and
  TensorFlow use them), its input resized to each batch size."""

  def __init__(self, loaded: Loaded, device: Device):
    from graph_prune.adapters import tflite_model  # pylint: disable=g-import-not-at-top
    self._adapter = tflite_model
    self._model = loaded.model
    self.inputs = tuple(Input(n, (None,) + tuple(None if d < 0 else d for d in shape[1:]), t)
                        for n, shape, t in zip(loaded.model.inputs, loaded.model.shapes,
                                               loaded.model.dtypes))
    self.outputs = tuple(loaded.model.outputs)
    self.device = device

  def bind(self, batch: int, seed: int = 0) -> Bound:
    arrays = random_inputs(self.inputs, batch, seed)
    runner = self._adapter.Runner(self._model, threads=os.cpu_count())
    runner(arrays)   # sizes the tensors once; later calls only set and invoke
    return Bound(lambda: runner(arrays), lambda: runner(arrays))


_ORT_TYPES = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
    "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int16)": "int16",
    "tensor(int8)": "int8", "tensor(uint8)": "uint8", "tensor(bool)": "bool",
}


def build(loaded: Loaded, device: Device, xla: bool, feed_weights: bool = False):
  """A runner (TFRunner, ORTRunner or LiteRTRunner) with .inputs, .outputs, .device and
  .bind(batch, seed). feed_weights (TensorFlow): the large weights are fed as
  arguments instead of being constants of the graph (TFRunner)."""
  if loaded.format == ONNX:
    return ORTRunner(loaded, device)
  if loaded.format == TFLITE:
    return LiteRTRunner(loaded, device)
  return TFRunner(loaded, device, xla, feed_weights)


def init_runtime(fmt: str, device: Device) -> None:
  """Imports the runtime and runs one tiny op, so that start-up allocations
  (thread pools, allocator arenas) are not counted as a model's memory."""
  if fmt == ONNX:
    import onnxruntime  # pylint: disable=g-import-not-at-top,unused-import
    from graph_prune.adapters import onnx_model  # pylint: disable=g-import-not-at-top,unused-import
    return
  if fmt == TFLITE:
    from graph_prune.adapters import tflite_model  # pylint: disable=g-import-not-at-top,unused-import
    return
  from graph_prune.adapters import tf_model  # pylint: disable=g-import-not-at-top,unused-import
  tf = _tf()
  if device.kind == "tpu" and not tf.config.list_logical_devices("TPU"):
    _init_tpu()
  with tf.device(device.tf_name):
    np.asarray(tf.zeros([4]) + 1.0)


def device_memory(device: Device, reset: bool = False) -> Optional[int]:
  """TensorFlow's allocator peak on a GPU/TPU (bytes); None where it has none."""
  if device.kind == "cpu":
    return None
  tf = _tf()
  name = f"{device.kind.upper()}:{device.index}"
  try:
    if reset:
      tf.config.experimental.reset_memory_stats(name)
      return None
    return int(tf.config.experimental.get_memory_info(name)["peak"])
  except (ValueError, tf.errors.OpError):
    return None


def versions(formats: Sequence[str]) -> dict[str, str]:
  """Versions of the runtimes that the given formats use."""
  import platform  # pylint: disable=g-import-not-at-top
  out = {"python": platform.python_version(), "numpy": np.__version__}
  if any(f != ONNX for f in formats):
    out["tensorflow"] = _tf().__version__
  if ONNX in formats:
    import onnx  # pylint: disable=g-import-not-at-top
    import onnxruntime  # pylint: disable=g-import-not-at-top
    out["onnx"] = onnx.__version__
    out["onnxruntime"] = onnxruntime.__version__
  return out


def _tf():
  # tf_model sets TensorFlow's log level before importing it: import through it.
  from graph_prune.adapters import tf_model  # pylint: disable=g-import-not-at-top
  return tf_model.tf
