"""Latency of every linear layer of a model across its input and output widths,
measured on this device: the table --allocation=latency plans with.

Each convolution or dense layer is rebuilt alone, in the model's own format,
with its own input size, kernel, strides, dilations and padding, and timed by
the runtime the whole-model benchmark uses (bench/runners.py: XLA or plain
TensorFlow, ONNX Runtime) at the probe's batch size, on a grid of input x output
widths (fractions GRID of each; a depthwise layer has one width). The timings
are made non-decreasing in both widths (what looks cheaper with more channels
is noise); between grid points latency is interpolated bilinearly; below the
smallest it is held (a layer does not get cheaper than its call). Figures are cached per device,
runtime, batch and layer shape (bench/widths.Cache), so layers of one shape --
the repeated blocks of a ResNet -- are timed once, and a second run of the same
model reads them all from the cache.

A layer that is not a 2-D convolution (groups 1 or depthwise) or a dense layer
(a transposed, grouped or 3-D convolution) is not timed: its latency is taken
as its FLOPs times the median milliseconds per FLOP of the timed layers, and
the table says so.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Optional, Sequence

from absl import logging
import numpy as np

from graph_prune.bench import runners
from graph_prune.bench import timing
from graph_prune.bench import widths as widths_lib
from graph_prune.graph import view as view_lib
from graph_prune.ops import desc

GRID = (0.125, 0.25, 0.5, 0.75, 1.0)
# Each grid point: a short, repeated measurement (one layer, one model).
_SETTINGS = timing.Settings(warmup=2, min_runs=5, max_seconds=0.25, target_rse=0.02)


@dataclasses.dataclass(frozen=True)
class Shape:
  """One linear layer as timed: kind, input size (spatial, NHWC order) and the
  full widths."""
  kind: str                         # "conv", "depthwise" or "dense"
  spatial: tuple[int, ...]          # input spatial size; dense: leading non-batch axes
  kernel: tuple[int, ...] = ()
  strides: tuple[int, ...] = ()
  dilations: tuple[int, ...] = ()
  pads: tuple[tuple[int, int], ...] = ()   # explicit (begin, end) per spatial axis
  cin: int = 0
  cout: int = 0
  batch: int = 1

  @property
  def key(self) -> str:
    geo = "x".join(map(str, self.spatial))
    k = "x".join(map(str, self.kernel))
    s = "x".join(map(str, self.strides))
    d = "x".join(map(str, self.dilations))
    p = ",".join(f"{a}-{b}" for a, b in self.pads)
    return f"{self.kind}|{geo}|k{k}|s{s}|d{d}|p{p}|{self.cin}->{self.cout}|b{self.batch}"

  def widths(self) -> list[tuple[int, int]]:
    """The grid of (input, output) widths timed."""
    ins = sorted({max(1, round(f * self.cin)) for f in GRID})
    if self.kind == "depthwise":
      return [(c, c) for c in ins]
    outs = sorted({max(1, round(f * self.cout)) for f in GRID})
    return [(a, b) for a in ins for b in outs]


@dataclasses.dataclass(frozen=True)
class Layer:
  """A linear layer of the model and how its latency is known."""
  node: str
  x: str                    # its input activation (channels: the input width)
  z: str                    # its output (channels: the output width)
  cin: int
  cout: int
  flops: int                # at full width, one sample
  shape: Optional[Shape]    # None: not timed (why says why)
  why: str = ""


def _padding(lin: desc.Linear, spatial: Sequence[int]) -> Optional[tuple[tuple[int, int], ...]]:
  """Explicit (begin, end) pads per spatial axis, or None when unknown."""
  if lin.padding == "VALID":
    return tuple((0, 0) for _ in spatial)
  if lin.padding == "EXPLICIT":
    return tuple(tuple(p) for p in lin.pads) if lin.pads else None
  out = []
  for size, k, s, d in zip(spatial, lin.kernel, lin.strides or (1,) * len(spatial),
                           lin.dilations or (1,) * len(spatial)):
    extent = (k - 1) * d + 1
    total = max((math.ceil(size / s) - 1) * s + extent - size, 0)
    small = total // 2
    out.append((small, total - small) if lin.padding == "SAME_UPPER" else (total - small, small))
  return tuple(out)


def layers_of(graph: view_lib.GraphView, ops: desc.Registry, batch: int) -> list[Layer]:
  """Every linear layer of the view, in graph order, with its timing shape."""
  out = []
  for node in graph.nodes:
    lin = ops.linear(graph, node)
    if lin is None or lin.weight not in graph.constants:
      continue
    w = graph.constants[lin.weight]
    x_shape = graph.shape(node.inputs[0])
    cout = int(w.shape[lin.out_axis]) * (int(w.shape[lin.multiplier_axis])
                                        if lin.multiplier_axis is not None else 1)
    cin = lin.fan_in * lin.groups
    flops = desc.linear_flops(graph, node, lin)
    base = dict(node=node.name, x=node.inputs[0], z=node.outputs[0], cin=cin, cout=cout,
                flops=flops)
    if x_shape is None or any(not isinstance(d, int) or d < 1 for d in x_shape[1:]):
      out.append(Layer(**base, shape=None, why="its input size is not known"))
      continue
    axis = lin.channel_axis % len(x_shape)
    spatial = tuple(int(d) for i, d in enumerate(x_shape) if i not in (0, axis))
    if lin.transposed:
      out.append(Layer(**base, shape=None, why="a transposed convolution"))
      continue
    if not lin.kernel:
      if axis != len(x_shape) - 1:
        out.append(Layer(**base, shape=None, why="a dense layer whose features are not last"))
        continue
      out.append(Layer(**base, shape=Shape("dense", spatial, cin=cin, cout=cout, batch=batch)))
      continue
    if len(lin.kernel) != 2:
      out.append(Layer(**base, shape=None, why=f"a {len(lin.kernel)}-D convolution"))
      continue
    depthwise = lin.groups == cin and lin.groups > 1
    if lin.groups > 1 and not (depthwise and cout == cin):
      out.append(Layer(**base, shape=None, why=f"a grouped convolution ({lin.groups} groups)"))
      continue
    pads = _padding(lin, spatial)
    if pads is None:
      out.append(Layer(**base, shape=None, why=f"padding {lin.padding} without its pads"))
      continue
    out.append(Layer(**base, shape=Shape(
        "depthwise" if depthwise else "conv", spatial, tuple(lin.kernel),
        tuple(lin.strides or (1, 1)), tuple(lin.dilations or (1, 1)), pads, cin, cout, batch)))
  return out


# --- one layer, built alone ----------------------------------------------------


def _tf_layer(shape: Shape, cin: int, cout: int):
  """A frozen GraphDef computing the layer (NHWC) at these widths."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from graph_prune.adapters import tf_model  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(cin * 7919 + cout)
  g = tf.Graph()
  with g.as_default():
    x = tf.compat.v1.placeholder(tf.float32, (None,) + shape.spatial + (cin,), name="x")
    if shape.kind == "dense":
      w = tf.constant(rng.standard_normal((cin, cout)).astype(np.float32))
      y = tf.tensordot(x, w, 1) if shape.spatial else tf.matmul(x, w)
    else:
      padded = tf.pad(x, [[0, 0], *map(list, shape.pads), [0, 0]]) if any(
          a or b for a, b in shape.pads) else x
      if shape.kind == "depthwise":
        w = tf.constant(rng.standard_normal(shape.kernel + (cin, 1)).astype(np.float32))
        y = tf.nn.depthwise_conv2d(padded, w, (1,) + shape.strides + (1,), "VALID",
                                   dilations=shape.dilations)
      else:
        w = tf.constant(rng.standard_normal(shape.kernel + (cin, cout)).astype(np.float32))
        y = tf.nn.conv2d(padded, w, shape.strides, "VALID", dilations=shape.dilations)
    tf.identity(y, name="y")
  return tf_model.TFModel(tf_model.GRAPHDEF, g.as_graph_def(), ("x:0",), ("y:0",))


def _onnx_layer(shape: Shape, cin: int, cout: int):
  """An ONNX model computing the layer (NCHW) at these widths."""
  import onnx  # pylint: disable=g-import-not-at-top
  from onnx import helper, numpy_helper  # pylint: disable=g-import-not-at-top
  from graph_prune.adapters import onnx_model  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(cin * 7919 + cout)
  if shape.kind == "dense":
    x_shape = ["n", *shape.spatial, cin]
    w = rng.standard_normal((cin, cout)).astype(np.float32)
    node = helper.make_node("MatMul", ["x", "w"], ["y"])
  else:
    x_shape = ["n", cin, *shape.spatial]
    groups = cin if shape.kind == "depthwise" else 1
    w = rng.standard_normal((cout if groups == 1 else cin, cin // groups) + shape.kernel
                            ).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], group=groups,
                            strides=list(shape.strides), dilations=list(shape.dilations),
                            pads=[a for a, _ in shape.pads] + [b for _, b in shape.pads])
  graph = helper.make_graph(
      [node], "layer", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, x_shape)],
      [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
      [numpy_helper.from_array(w, "w")])
  proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
  return onnx_model.ONNXModel(proto, ("x",), ("y",))


class Profiler:
  """Times layers on one device and runtime, through the cache."""

  def __init__(self, fmt: str, device: str = "auto", xla: bool = True,
               cache: Optional[str] = None):
    self.format = runners.ONNX if fmt == "onnx" else "graphdef"
    self.device = runners.resolve_device(device, self.format)
    runners.init_runtime(self.format, self.device)
    self.xla = xla
    self.cache = widths_lib.Cache(cache or widths_lib.default_cache())
    if self.format == runners.ONNX:
      import onnxruntime  # pylint: disable=g-import-not-at-top
      self.device_key = (f"{runners.describe(self.device, self.format)}|onnxruntime "
                         f"{onnxruntime.__version__}|{widths_lib.cpu_name()}")
    else:
      self.device_key = widths_lib.device_key(xla) + f"|{self.device.kind}"
    self.timed = 0
    self.cached = 0
    self.seconds = 0.0

  def _time(self, shape: Shape, cin: int, cout: int) -> float:
    build = _onnx_layer if self.format == runners.ONNX else _tf_layer
    loaded = runners.Loaded("", self.format, build(shape, cin, cout))
    bound = runners.build(loaded, self.device, self.xla).bind(shape.batch, seed=0)
    result = timing.measure([bound.call], _SETTINGS)
    return 1e3 * timing.summarise(result.times[0]).median

  def table(self, shape: Shape) -> "Table":
    points = {}
    for cin, cout in shape.widths():
      key = f"{cin}x{cout}"
      ms = self.cache.get(self.device_key, shape, key)
      if ms is None:
        t0 = time.perf_counter()
        ms = self._time(shape, cin, cout)
        self.seconds += time.perf_counter() - t0
        self.cache.put(self.device_key, shape, key, ms)
        self.timed += 1
      else:
        self.cached += 1
      points[(cin, cout)] = ms
    return Table.from_points(shape, points)

  def save(self) -> None:
    self.cache.save()


@dataclasses.dataclass(frozen=True)
class Table:
  """Latency (ms) of one layer on a grid of widths; bilinear in between."""
  ins: np.ndarray            # ascending input widths
  outs: np.ndarray           # ascending output widths (depthwise: [0], unused)
  ms: np.ndarray             # [len(ins), len(outs)]
  depthwise: bool = False

  @classmethod
  def from_points(cls, shape: Shape, points: dict) -> "Table":
    ins = np.array(sorted({a for a, _ in points}), np.float64)
    if shape.kind == "depthwise":
      return cls(ins, np.zeros(1), _monotone(np.array([[points[(int(a), int(a))]] for a in ins])),
                 True)
    outs = np.array(sorted({b for _, b in points}), np.float64)
    ms = np.array([[points[(int(a), int(b))] for b in outs] for a in ins])
    return cls(ins, outs, _monotone(ms))

  def __call__(self, cin: float, cout: float) -> float:
    i, fi = _locate(self.ins, cin)
    if self.depthwise:
      return float(self.ms[i, 0] * (1 - fi) + self.ms[min(i + 1, len(self.ins) - 1), 0] * fi)
    j, fj = _locate(self.outs, cout)
    i2, j2 = min(i + 1, len(self.ins) - 1), min(j + 1, len(self.outs) - 1)
    m = self.ms
    return float((m[i, j] * (1 - fj) + m[i, j2] * fj) * (1 - fi) +
                 (m[i2, j] * (1 - fj) + m[i2, j2] * fj) * fi)


def _monotone(ms: np.ndarray) -> np.ndarray:
  """The timings made non-decreasing in both widths (a running maximum): more
  channels never cost less, and what looks cheaper is timing noise, which
  would otherwise show the allocation savings that are not there."""
  return np.maximum.accumulate(np.maximum.accumulate(ms, axis=0), axis=1)


def _locate(grid: np.ndarray, v: float) -> tuple[int, float]:
  """(index, fraction) of v between grid[index] and grid[index + 1], clamped."""
  if v <= grid[0] or len(grid) == 1:
    return 0, 0.0
  if v >= grid[-1]:
    return len(grid) - 1, 0.0
  i = int(np.searchsorted(grid, v, side="right") - 1)
  return i, float((v - grid[i]) / (grid[i + 1] - grid[i]))


@dataclasses.dataclass(frozen=True)
class Profile:
  """Every linear layer of a model with its latency as a function of its widths."""
  layers: tuple[Layer, ...]
  costs: tuple[Any, ...]          # per layer: f(cin, cout) -> ms
  doc: dict

  def total(self) -> float:
    return float(sum(f(l.cin, l.cout) for l, f in zip(self.layers, self.costs)))


def profile(graph: view_lib.GraphView, ops: desc.Registry, fmt: str, device: str = "auto",
            xla: bool = True, batch: int = 1, cache: Optional[str] = None) -> Profile:
  """Every linear layer of the view timed on its grid (cached), the others by FLOPs."""
  t0 = time.perf_counter()
  layers = layers_of(graph, ops, batch)
  prof = Profiler(fmt, device, xla, cache)
  tables: dict[str, Table] = {}
  for layer in layers:
    if layer.shape is not None and layer.shape.key not in tables:
      tables[layer.shape.key] = prof.table(layer.shape)
  prof.save()
  per_flop = [tables[l.shape.key](l.cin, l.cout) / l.flops for l in layers
              if l.shape is not None and l.flops]
  rate = float(np.median(per_flop)) if per_flop else 0.0
  costs = []
  for layer in layers:
    if layer.shape is not None:
      costs.append(tables[layer.shape.key])
    else:
      full = layer.flops * rate
      costs.append(lambda a, b, full=full, l=layer: full * (a / max(l.cin, 1)) *
                   (b / max(l.cout, 1)))
  untimed = [f"{l.node}: {l.why}" for l in layers if l.shape is None]
  for line in untimed:
    logging.info("latency profile: %s (taken as its FLOPs)", line)
  doc = {"device": prof.device_key, "batch": batch, "xla": xla, "layers": len(layers),
         "shapes": len(tables), "points_timed": prof.timed, "points_cached": prof.cached,
         "timing_s": round(prof.seconds, 2), "seconds": round(time.perf_counter() - t0, 2),
         "cache": prof.cache.path, "grid": list(GRID), "untimed": untimed}
  return Profile(tuple(layers), tuple(costs), doc)
