"""Op descriptions: everything the code knows about one op kind, in one place.

A description holds the op's channel rule (how channels flow through it: see
channels.py) and the facts other stages read: which constant is a linear layer's
weight and along which axes it maps input to output channels, its kernel and
strides (FLOPs, width profiling, calibration), which inputs are a batch norm's
statistics, and whether a per-channel constant operand scales or shifts.

For ONNX a description covers an opset range [since, until): where an op changed
meaning (Softmax at 13, Reduce* axes at 18, ...) it has one description per range,
as tf2onnx's versioned handlers do. TensorFlow ops have one range (version 0).
An op with no description for the model's version blocks its channels.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Iterator, Optional

from graph_prune.graph import view
from graph_prune.ops import channels


@dataclasses.dataclass(frozen=True)
class Linear:
  """A layer whose constant weight maps input channels to output channels.

  The input and output activations carry channels on `channel_axis`; the weight
  holds output channels on `out_axis` and the input channels of one group on
  `in_axis`. Depthwise layers have groups == input channels and multiplier
  outputs per input channel.
  """
  weight: str
  out_axis: int
  in_axis: int
  channel_axis: int
  fan_in: int                       # input channels each output channel reads
  groups: int = 1
  multiplier: int = 1
  kernel: tuple[int, ...] = ()      # spatial kernel extent per spatial axis (empty: dense)
  strides: tuple[int, ...] = ()
  transposed: bool = False          # a transposed convolution: FLOPs follow its input
  # Where the input is read (reconstruction extracts the same patches): dilation
  # per spatial axis; padding "VALID", "SAME_UPPER" (TensorFlow's SAME: the odd
  # pixel at the end), "SAME_LOWER" or "EXPLICIT" with (begin, end) per spatial axis.
  dilations: tuple[int, ...] = ()
  padding: str = "VALID"
  pads: tuple[tuple[int, int], ...] = ()
  # The weight axis that, after out_axis, indexes output channels (TensorFlow's
  # depthwise [H, W, C, M]: output c*M + m), or None.
  multiplier_axis: Optional[int] = None
  # The op's own bias input (ONNX Conv's B, Gemm's C), added to every output.
  bias: str = ""
  # Factors the op applies besides x @ W (ONNX Gemm's alpha and beta).
  alpha: float = 1.0
  beta: float = 1.0


@dataclasses.dataclass(frozen=True)
class Norm:
  """An inference-mode batch norm: its statistics and where its channels are."""
  scale: str
  shift: str
  mean: str
  variance: str
  channel_axis: int
  epsilon: float = 1e-5


@dataclasses.dataclass(frozen=True)
class OpDesc:
  ops: tuple[str, ...]
  channels: channels.Rule
  doc: str                          # one line for the README's table of supported ops
  since: int = 0                    # first opset (ONNX) this description holds for
  until: Optional[int] = None       # first opset it no longer holds for
  linear: Optional[Callable[[view.GraphView, view.Node], Optional[Linear]]] = None
  norm: Optional[Callable[[view.GraphView, view.Node], Optional[Norm]]] = None
  # What a per-channel constant operand does: "scale" (Mul), "shift" (Add, BiasAdd).
  affine: str = ""
  # The image layout ("NHWC"/"NCHW") in which the op reads its first input, where
  # the op says (a layout-changing Transpose); linear layers say it by channel_axis.
  reads: Optional[Callable[[view.GraphView, view.Node], Optional[str]]] = None

  def holds_for(self, version: int) -> bool:
    return self.since <= version and (self.until is None or version < self.until)


class Registry:
  """The descriptions of one format, looked up by op type and opset version."""

  def __init__(self, fmt: str):
    self.format = fmt
    self._by_op: dict[str, list[OpDesc]] = {}

  def op(self, *ops: str, doc: str, since: int = 0, until: Optional[int] = None,
         linear=None, norm=None, affine: str = "", reads=None):
    """Decorator: files the channel rule it wraps as the description of `ops`."""
    def register(fn):
      desc = OpDesc(tuple(ops), fn, doc, since, until, linear, norm, affine, reads)
      for op in ops:
        for other in self._by_op.get(op, ()):
          if max(desc.since, other.since) < min(desc.until or math.inf, other.until or math.inf):
            raise ValueError(f"{op}: overlapping opset ranges")
        self._by_op.setdefault(op, []).append(desc)
      return fn
    return register

  def lookup(self, op: str, version: int = 0) -> Optional[OpDesc]:
    for desc in self._by_op.get(op, ()):
      if desc.holds_for(version):
        return desc
    return None

  def of(self, graph: view.GraphView, node: view.Node) -> Optional[OpDesc]:
    return self.lookup(node.op, graph.opset)

  def linear(self, graph: view.GraphView, node: view.Node) -> Optional[Linear]:
    desc = self.of(graph, node)
    return desc.linear(graph, node) if desc is not None and desc.linear else None

  def norm(self, graph: view.GraphView, node: view.Node) -> Optional[Norm]:
    desc = self.of(graph, node)
    return desc.norm(graph, node) if desc is not None and desc.norm else None

  def affine(self, graph: view.GraphView, node: view.Node) -> str:
    desc = self.of(graph, node)
    return desc.affine if desc is not None else ""

  def input_layout(self, graph: view.GraphView, tensor: str) -> Optional[str]:
    """The layout in which the first reader that says so reads an image tensor
    (a 2-D convolution by its channel axis, a layout-changing Transpose), or None."""
    for node, index in graph.consumers(tensor):
      d = self.of(graph, node)
      if index != 0 or d is None:
        continue
      lin = d.linear(graph, node) if d.linear else None
      if lin is not None and len(lin.kernel) == 2:
        return "NCHW" if lin.channel_axis == 1 else "NHWC"
      layout = d.reads(graph, node) if d.reads else None
      if layout:
        return layout
    return None

  def descriptions(self) -> Iterator[OpDesc]:
    seen = set()
    for descs in self._by_op.values():
      for desc in descs:
        if id(desc) not in seen:
          seen.add(id(desc))
          yield desc


def _per_sample(shape) -> int:
  if shape is None or any(s is None for s in shape[1:]):
    return 0
  return math.prod(shape[1:])


def linear_flops(graph: view.GraphView, node: view.Node, lin: Linear) -> int:
  """Multiply-adds times two, for one sample (an unknown batch counts as 1): every
  output reads kernel x fan_in weights; a transposed convolution spreads every
  input over kernel x its group's outputs."""
  kernel = math.prod(lin.kernel)
  if lin.transposed:
    outs = int(graph.constants[lin.weight].shape[lin.out_axis])
    return 2 * _per_sample(graph.shape(node.inputs[0])) * kernel * outs
  return 2 * _per_sample(graph.shape(node.outputs[0])) * kernel * lin.fan_in


def einsum_linear(g: view.GraphView, node: view.Node) -> Optional[Linear]:
  """The linear layer an einsum of x and a constant 2-D weight is (channels.einsum_parts)."""
  parts = channels.einsum_parts(g, node)
  if parts is None:
    return None
  _, tw, out, contracted, new = parts
  w = g.constants[node.inputs[1]]
  return Linear(node.inputs[1], tw.index(new), tw.index(contracted), out.index(new),
                int(w.shape[tw.index(contracted)]))


def dense_linear(g: view.GraphView, node: view.Node, transposed: bool, bias: str = "",
                 alpha: float = 1.0, beta: float = 1.0) -> Optional[Linear]:
  """x @ W with a constant 2-D W (W given as [out, in] when `transposed`)."""
  w = g.constants.get(node.inputs[1]) if len(node.inputs) > 1 else None
  if w is None or w.ndim != 2 or node.inputs[0] in g.constants:
    return None
  in_axis, out_axis = (1, 0) if transposed else (0, 1)
  return Linear(node.inputs[1], out_axis, in_axis, -1, int(w.shape[in_axis]), bias=bias,
                alpha=alpha, beta=beta)


def spatial_linear(node: view.Node, w, out_axis: int, in_axis: int, channel_first: bool,
                   fan_in: int, **kw) -> Linear:
  """A convolution-like layer: its kernel is the weight's spatial axes (all but the
  two channel axes), its strides the node's `strides` on the spatial axes of its
  input (TensorFlow's 4- or 5-long attribute, or ONNX's one per spatial axis)."""
  rank = w.ndim
  kernel = tuple(int(k) for a, k in enumerate(w.shape) if a not in (out_axis % rank,
                                                                   in_axis % rank))
  spatial = rank - 2

  def per_axis(values):
    values = tuple(int(v) for v in (values or (1,) * spatial))
    if len(values) == rank:    # TensorFlow: one entry per input axis
      values = values[2:] if channel_first else values[1:-1]
    return values
  padding, pads = _padding(node.attrs, spatial, channel_first)
  return Linear(node.inputs[1], out_axis % rank, in_axis % rank, 1 if channel_first else -1,
                fan_in, kernel=kernel, strides=per_axis(node.attrs.get("strides")),
                dilations=per_axis(node.attrs.get("dilations")), padding=padding, pads=pads,
                **kw)


def _padding(attrs, spatial: int, channel_first: bool):
  """(padding, explicit pads) from TensorFlow's `padding`/`explicit_paddings` or
  ONNX's `auto_pad`/`pads`."""
  if "padding" in attrs:      # TensorFlow
    mode = attrs["padding"]
    if mode == "EXPLICIT":
      flat = tuple(attrs.get("explicit_paddings") or (0,) * (2 * spatial + 4))
      pairs = [tuple(flat[i:i + 2]) for i in range(0, len(flat), 2)]
      pairs = pairs[2:] if channel_first else pairs[1:-1]
      return "EXPLICIT", tuple((int(b), int(e)) for b, e in pairs)
    return ("SAME_UPPER" if mode == "SAME" else mode), ()
  mode = attrs.get("auto_pad", "NOTSET") or "NOTSET"
  if mode != "NOTSET":
    return mode, ()
  flat = tuple(attrs.get("pads") or (0,) * (2 * spatial))
  return "EXPLICIT", tuple((int(flat[i]), int(flat[i + spatial])) for i in range(spatial))
