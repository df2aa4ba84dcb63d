"""Random CNNs from a grammar of the supported ops, as ONNX models (opsets 11 to
21) and as TensorFlow GraphDefs, and the properties every pruning of them must
have. Used by //tests:random_cnn_test (a CI-size run under hypothesis) and
//tests:random_cnn_large (thousands of cases).

The grammar: convolution (plain, depthwise, grouped, transposed), batch norm and
per-channel affine, activations, residual adds across a stage, concat (of two
branches, or of a tensor with itself), split into branches, channel shuffle,
squeeze-excite, pooling, instance and group norm, constant padding and slices of
the channel axis, and a head of global pooling or flatten into dense layers. One
chain conv -> relu -> conv has planted dead channels (zero filters and biases).

Properties (run()): pruning at the case's ratio and criterion either refuses with
"nothing prunable" or writes a model that the oracle passed and that runs; and
pruning only the planted chain at the planted fraction removes exactly the dead
channels and leaves the outputs unchanged. Anything else (a traceback, a refusal
of another kind) is a failure.
"""

from __future__ import annotations

import dataclasses
import json
import os
import traceback
from typing import Optional

import numpy as np

CRITERIA = ("l1", "l2", "bn_scale", "fpgm", "random")
DEAD_NODE = "dead_conv"


@dataclasses.dataclass(frozen=True)
class Case:
  seed: int
  fmt: str          # "onnx" or "tf"
  opset: int        # ONNX opset (ignored for TensorFlow)
  ratio: float
  criterion: str


@dataclasses.dataclass(frozen=True)
class Result:
  case: Case
  status: str       # "ok", "nothing" (nothing prunable), "failed"
  detail: str = ""
  groups: int = 0
  blocks: tuple[str, ...] = ()


@dataclasses.dataclass
class T:
  """A tensor of the model being built: its name, channels and spatial size."""
  name: object
  c: int
  h: int


class _Onnx:
  """Builds an NCHW ONNX model."""

  def __init__(self, rng, opset):
    from onnx import helper  # pylint: disable=g-import-not-at-top
    self.helper, self.rng, self.opset = helper, rng, opset
    self.nodes, self.inits, self.count = [], [], 0

  def _name(self, prefix):
    self.count += 1
    return f"{prefix}{self.count}"

  def const(self, value, dtype=np.float32):
    from onnx import numpy_helper  # pylint: disable=g-import-not-at-top
    name = self._name("c")
    self.inits.append(numpy_helper.from_array(np.asarray(value, dtype), name))
    return name

  def op(self, op, inputs, outputs=1, name=None, **attrs):
    name = name or self._name(op.lower())
    outs = [name] if outputs == 1 else [f"{name}_{i}" for i in range(outputs)]
    self.nodes.append(self.helper.make_node(op, inputs, outs, name=name, **attrs))
    return outs[0] if outputs == 1 else outs

  def input(self, c, h):
    return T("x", c, h)

  def conv(self, t, cout, k=3, groups=1, name=None, weight=None, bias=None):
    w = weight if weight is not None else self.rng.standard_normal(
        (cout, t.c // groups, k, k)) * (1.0 / np.sqrt(t.c // groups * k * k))
    b = bias if bias is not None else self.rng.standard_normal(cout) * 0.3
    out = self.op("Conv", [t.name, self.const(w), self.const(b)], name=name,
                  pads=[k // 2] * 4, group=groups)
    return T(out, cout, t.h)

  def depthwise(self, t, multiplier=1):
    return self.conv(t, t.c * multiplier, groups=t.c)

  def transposed(self, t, cout):
    w = self.rng.standard_normal((t.c, cout, 2, 2)) / np.sqrt(t.c)
    out = self.op("ConvTranspose", [t.name, self.const(w), self.const(
        self.rng.standard_normal(cout) * 0.3)], strides=[2, 2])
    return T(out, cout, t.h * 2)

  def batch_norm(self, t):
    r = self.rng
    return T(self.op("BatchNormalization", [t.name, self.const(r.uniform(0.5, 1.5, t.c)),
                                            self.const(r.normal(0, 0.3, t.c)),
                                            self.const(r.normal(0, 0.3, t.c)),
                                            self.const(r.uniform(0.5, 1.5, t.c))]), t.c, t.h)

  def affine(self, t):
    shape = (t.c, 1, 1)
    h = self.op("Mul", [t.name, self.const(self.rng.uniform(0.5, 1.5, shape))])
    return T(self.op("Add", [h, self.const(self.rng.normal(0, 0.3, shape))]), t.c, t.h)

  def act(self, t, kind):
    if kind == "hardswish" and self.opset < 14:
      kind = "relu"
    op = {"relu": "Relu", "sigmoid": "Sigmoid", "tanh": "Tanh", "leaky": "LeakyRelu",
          "elu": "Elu", "hardswish": "HardSwish"}[kind]
    return T(self.op(op, [t.name]), t.c, t.h)

  def add(self, a, b):
    return T(self.op("Add", [a.name, b.name]), a.c, a.h)

  def mul(self, a, b):
    return T(self.op("Mul", [a.name, b.name]), a.c, a.h)

  def concat(self, ts):
    return T(self.op("Concat", [t.name for t in ts], axis=1), sum(t.c for t in ts), ts[0].h)

  def split(self, t, sizes):
    if self.opset >= 13:
      outs = self.op("Split", [t.name, self.const(sizes, np.int64)], outputs=len(sizes), axis=1)
    else:
      outs = self.op("Split", [t.name], outputs=len(sizes), axis=1, split=list(sizes))
    return [T(o, s, t.h) for o, s in zip(outs, sizes)]

  def shuffle(self, t, groups):
    h = self.op("Reshape", [t.name, self.const([0, groups, t.c // groups, t.h, t.h], np.int64)])
    h = self.op("Transpose", [h], perm=[0, 2, 1, 3, 4])
    return T(self.op("Reshape", [h, self.const([0, t.c, t.h, t.h], np.int64)]), t.c, t.h)

  def pool(self, t, kind):
    op = "MaxPool" if kind == "max" else "AveragePool"
    return T(self.op(op, [t.name], kernel_shape=[2, 2], strides=[2, 2]), t.c, t.h // 2)

  def gap(self, t):
    return T(self.op("GlobalAveragePool", [t.name]), t.c, 1)

  def instance_norm(self, t):
    return T(self.op("InstanceNormalization", [t.name, self.const(
        self.rng.uniform(0.5, 1.5, t.c)), self.const(self.rng.normal(0, 0.3, t.c))]), t.c, t.h)

  def group_norm(self, t, groups):
    if self.opset < 21:
      return self.instance_norm(t)
    return T(self.op("GroupNormalization", [t.name, self.const(self.rng.uniform(0.5, 1.5, t.c)),
                                            self.const(self.rng.normal(0, 0.3, t.c))],
                     num_groups=groups), t.c, t.h)

  def pad_channels(self, t, before, after):
    pads = [0, before, 0, 0, 0, after, 0, 0]
    return T(self.op("Pad", [t.name, self.const(pads, np.int64)]), t.c + before + after, t.h)

  def slice_channels(self, t, start, stop):
    out = self.op("Slice", [t.name, self.const([start], np.int64), self.const([stop], np.int64),
                            self.const([1], np.int64)])
    return T(out, stop - start, t.h)

  def dense_head(self, t, hidden, classes, flatten_all):
    if not flatten_all:
      t = self.gap(t)
    v = self.op("Flatten", [t.name], axis=1)
    width = t.c * t.h * t.h
    w1 = self.rng.standard_normal((width, hidden)) / np.sqrt(width)
    v = self.op("Relu", [self.op("Gemm", [v, self.const(w1), self.const(
        self.rng.normal(0, 0.3, hidden))])])
    w2 = self.rng.standard_normal((classes, hidden)) / np.sqrt(hidden)
    return self.op("Gemm", [v, self.const(w2), self.const(self.rng.normal(0, 0.3, classes))],
                   transB=1)

  def save(self, out, classes, size, path):
    import onnx  # pylint: disable=g-import-not-at-top
    helper, f = self.helper, onnx.TensorProto.FLOAT
    graph = helper.make_graph(
        self.nodes, "random_cnn", [helper.make_tensor_value_info("x", f, ["N", 3, size, size])],
        [helper.make_tensor_value_info(out, f, ["N", classes])], self.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)])
    model.ir_version = 8 if self.opset < 21 else 10
    onnx.checker.check_model(model, full_check=True)
    onnx.save_model(model, path)


class _TF:
  """Builds an NHWC TensorFlow graph (raw ops, frozen)."""

  def __init__(self, rng):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    self.tf, self.rng = tf, rng
    self.graph = tf.Graph()

  def c(self, value):
    return self.tf.constant(np.asarray(value, np.float32))

  def input(self, c, h):
    with self.graph.as_default():
      return T(self.tf.compat.v1.placeholder(self.tf.float32, [None, h, h, c], name="x"), c, h)

  def conv(self, t, cout, k=3, groups=1, name=None, weight=None, bias=None):
    del groups  # grouped convolution is not in TensorFlow's CPU kernels
    tf = self.tf
    w = weight if weight is not None else self.rng.standard_normal(
        (k, k, t.c, cout)) * (1.0 / np.sqrt(t.c * k * k))
    b = bias if bias is not None else self.rng.standard_normal(cout) * 0.3
    with self.graph.as_default():
      out = tf.nn.bias_add(tf.nn.conv2d(t.name, self.c(w), 1, "SAME", name=name), self.c(b))
    return T(out, cout, t.h)

  def depthwise(self, t, multiplier=1):
    tf = self.tf
    w = self.rng.standard_normal((3, 3, t.c, multiplier)) / 3.0
    with self.graph.as_default():
      out = tf.nn.depthwise_conv2d(t.name, self.c(w), [1, 1, 1, 1], "SAME")
      out = tf.nn.bias_add(out, self.c(self.rng.standard_normal(t.c * multiplier) * 0.3))
    return T(out, t.c * multiplier, t.h)

  def transposed(self, t, cout):
    tf = self.tf
    w = self.rng.standard_normal((2, 2, cout, t.c)) / np.sqrt(t.c)
    with self.graph.as_default():
      shape = tf.stack([tf.shape(t.name)[0], t.h * 2, t.h * 2, cout])
      out = tf.nn.conv2d_transpose(t.name, self.c(w), shape, 2, "SAME")
      out = tf.nn.bias_add(out, self.c(self.rng.standard_normal(cout) * 0.3))
    return T(out, cout, t.h * 2)

  def batch_norm(self, t):
    r, tf = self.rng, self.tf
    with self.graph.as_default():
      out, _, _ = tf.compat.v1.nn.fused_batch_norm(
          t.name, self.c(r.uniform(0.5, 1.5, t.c)), self.c(r.normal(0, 0.3, t.c)),
          mean=self.c(r.normal(0, 0.3, t.c)), variance=self.c(r.uniform(0.5, 1.5, t.c)),
          is_training=False)
    return T(out, t.c, t.h)

  def affine(self, t):
    with self.graph.as_default():
      out = t.name * self.c(self.rng.uniform(0.5, 1.5, t.c)) + self.c(
          self.rng.normal(0, 0.3, t.c))
    return T(out, t.c, t.h)

  def act(self, t, kind):
    tf = self.tf
    fn = {"relu": tf.nn.relu, "sigmoid": tf.sigmoid, "tanh": tf.tanh,
          "leaky": tf.nn.leaky_relu, "elu": tf.nn.elu,
          "hardswish": lambda v: v * tf.nn.relu6(v + 3.0) / 6.0}[kind]
    with self.graph.as_default():
      return T(fn(t.name), t.c, t.h)

  def add(self, a, b):
    with self.graph.as_default():
      return T(a.name + b.name, a.c, a.h)

  def mul(self, a, b):
    with self.graph.as_default():
      return T(a.name * b.name, a.c, a.h)

  def concat(self, ts):
    with self.graph.as_default():
      return T(self.tf.concat([t.name for t in ts], axis=3), sum(t.c for t in ts), ts[0].h)

  def split(self, t, sizes):
    with self.graph.as_default():
      equal = len(set(sizes)) == 1
      parts = self.tf.split(t.name, len(sizes) if equal else list(sizes), axis=3)
    return [T(p, s, t.h) for p, s in zip(parts, sizes)]

  def shuffle(self, t, groups):
    tf = self.tf
    with self.graph.as_default():
      h = tf.reshape(t.name, [-1, t.h, t.h, groups, t.c // groups])
      h = tf.reshape(tf.transpose(h, [0, 1, 2, 4, 3]), [-1, t.h, t.h, t.c])
    return T(h, t.c, t.h)

  def pool(self, t, kind):
    tf = self.tf
    fn = tf.nn.max_pool2d if kind == "max" else tf.nn.avg_pool2d
    with self.graph.as_default():
      return T(fn(t.name, 2, 2, "VALID"), t.c, t.h // 2)

  def gap(self, t):
    with self.graph.as_default():
      return T(self.tf.reduce_mean(t.name, [1, 2], keepdims=True), t.c, 1)

  def instance_norm(self, t):
    return self.batch_norm(t)      # (no TensorFlow op: an inference batch norm instead)

  def group_norm(self, t, groups):
    del groups
    return self.batch_norm(t)

  def pad_channels(self, t, before, after):
    with self.graph.as_default():
      out = self.tf.pad(t.name, [[0, 0], [0, 0], [0, 0], [before, after]])
    return T(out, t.c + before + after, t.h)

  def slice_channels(self, t, start, stop):
    with self.graph.as_default():
      return T(t.name[:, :, :, start:stop], stop - start, t.h)

  def dense_head(self, t, hidden, classes, flatten_all):
    tf = self.tf
    with self.graph.as_default():
      if flatten_all:
        width = t.c * t.h * t.h
        v = tf.reshape(t.name, [-1, width])
      else:
        width = t.c
        v = tf.reduce_mean(t.name, [1, 2])
      w1 = self.rng.standard_normal((width, hidden)) / np.sqrt(width)
      v = tf.nn.relu(tf.matmul(v, self.c(w1)) + self.c(self.rng.normal(0, 0.3, hidden)))
      w2 = self.rng.standard_normal((hidden, classes)) / np.sqrt(hidden)
      return tf.matmul(v, self.c(w2)) + self.c(self.rng.normal(0, 0.3, classes))

  def save(self, out, classes, size, path):
    del classes, size
    with self.graph.as_default():
      self.tf.identity(out, name="out")
    with open(path, "wb") as f:
      f.write(self.graph.as_graph_def().SerializeToString())


_BLOCKS = ("conv", "depthwise", "grouped", "transposed", "bn", "affine", "act", "residual",
           "concat", "concat_self", "split", "shuffle", "se", "pool", "instance_norm",
           "group_norm", "pad", "slice", "branch_add", "branch_concat")


def _branch(b, rng, t: T, fmt: str, depth: int, width: Optional[int]) -> T:
  """One to three random blocks after t (nested), then a 1x1 convolution to
  `width` channels if given."""
  for _ in range(int(rng.integers(1, 4))):
    t, _ = _block(b, rng, t, str(rng.choice(_BLOCKS)), fmt, depth + 1)
  return b.conv(t, width, k=1) if width is not None else t


def _block(b, rng, t: T, kind: str, fmt: str, depth: int = 0) -> tuple[T, str]:
  """Applies one block of the grammar to t; returns the new tensor and the block
  actually built (a block that does not fit t falls back to a convolution).
  Branching blocks nest up to depth 2."""
  c = t.c
  if kind in ("branch_add", "branch_concat") and depth < 2:
    width = c if kind == "branch_add" else None
    a = _branch(b, rng, t, fmt, depth, width)
    z = _branch(b, rng, t, fmt, depth, width)
    if a.h == z.h and (kind == "branch_concat" or a.c == z.c):
      return (b.add(a, z) if kind == "branch_add" else b.concat([a, z])), kind
    return a, kind
  if kind == "depthwise" and c <= 24:
    return b.depthwise(t, int(rng.integers(1, 3))), kind
  if kind == "grouped" and fmt == "onnx" and c % 2 == 0:
    groups = int(rng.choice([g for g in (2, 4) if c % g == 0]))
    return b.conv(t, groups * int(rng.integers(1, 5)), groups=groups), kind
  if kind == "transposed" and t.h <= 8:
    return b.transposed(t, int(rng.integers(2, 9))), kind
  if kind == "bn":
    return b.batch_norm(t), kind
  if kind == "affine":
    return b.affine(t), kind
  if kind == "act":
    return b.act(t, str(rng.choice(["relu", "sigmoid", "tanh", "leaky", "elu", "hardswish"]))), kind
  if kind == "residual":
    h = b.act(b.batch_norm(b.conv(t, c)), "relu")
    return b.add(t, b.conv(h, c)), kind
  if kind == "concat":
    return b.concat([b.act(b.conv(t, int(rng.integers(2, 9))), "relu"),
                     b.act(b.conv(t, int(rng.integers(2, 9)), k=1), "relu")]), kind
  if kind == "concat_self":
    return b.concat([t, t]), kind
  if kind == "split" and c >= 2:
    first = int(rng.integers(1, c))
    parts = b.split(t, [first, c - first] if rng.random() < 0.5 or c % 2 else [c // 2] * 2)
    return b.concat([b.act(b.conv(p, int(rng.integers(2, 7))), "relu") for p in parts]), kind
  if kind == "shuffle" and c % 2 == 0 and c >= 4:
    return b.shuffle(t, 2), kind
  if kind == "se":
    s = b.act(b.conv(b.gap(t), max(1, c // 2), k=1), "relu")
    return b.mul(t, b.act(b.conv(s, c, k=1), "sigmoid")), kind
  if kind == "pool" and t.h >= 4:
    return b.pool(t, str(rng.choice(["max", "avg"]))), kind
  if kind == "instance_norm":
    return b.instance_norm(t), kind
  if kind == "group_norm" and c % 2 == 0:
    return b.group_norm(t, 2), kind
  if kind == "pad":
    return b.pad_channels(t, int(rng.integers(0, 3)), int(rng.integers(1, 3))), kind
  if kind == "slice" and c >= 3:
    start = int(rng.integers(0, c - 1))
    return b.slice_channels(t, start, int(rng.integers(start + 1, c + 1))), kind
  return b.act(b.conv(t, int(rng.integers(2, 17))), "relu"), "conv"


def build(case: Case, path: str) -> tuple[list[str], list[int], int]:
  """Writes the case's model to path; returns the blocks built, the planted dead
  channels and their layer's width."""
  rng = np.random.default_rng(case.seed)
  b = _Onnx(rng, case.opset) if case.fmt == "onnx" else _TF(rng)
  size = 8
  t = b.input(3, size)
  t = b.act(b.conv(t, int(rng.integers(4, 17))), "relu")
  blocks = ["conv"]
  count = int(rng.integers(2, 9))
  plant_at = int(rng.integers(0, count))
  dead, width = [], 0
  for i in range(count):
    if i == plant_at:
      # conv -> relu -> conv with dead channels in the first: zero filters, zero bias.
      width = int(rng.integers(4, 13))
      dead = sorted(rng.choice(width, size=int(rng.integers(1, width // 2 + 1)),
                               replace=False).tolist())
      shape = (width, t.c, 3, 3) if case.fmt == "onnx" else (3, 3, t.c, width)
      w = rng.standard_normal(shape) / np.sqrt(9 * t.c)
      bias = rng.standard_normal(width) * 0.3 + 0.5
      axis = 0 if case.fmt == "onnx" else 3
      index = [slice(None)] * 4
      index[axis] = dead
      w[tuple(index)] = 0
      bias[dead] = 0
      t = b.act(b.conv(t, width, name=DEAD_NODE, weight=w, bias=bias), "relu")
      t = b.act(b.conv(t, int(rng.integers(4, 13))), "relu")
      blocks.append("dead_chain")
    t, kind = _block(b, rng, t, str(rng.choice(_BLOCKS)), case.fmt)
    blocks.append(kind)
  classes = int(rng.integers(3, 8))
  out = b.dense_head(t, int(rng.integers(4, 17)), classes, flatten_all=bool(rng.random() < 0.3)
                     and t.h <= 4)
  b.save(out, classes, size, path)
  return blocks, dead, width


def _outputs(path, x):
  if path.endswith(".onnx"):
    import onnxruntime  # pylint: disable=g-import-not-at-top
    sess = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]
  from graph_prune.adapters import tf_model  # pylint: disable=g-import-not-at-top
  # By name: a branch the grammar left unused is another sink, and sinks have no order.
  runner = tf_model.Runner(tf_model.load(path, outputs=["out:0"]))
  try:
    return runner([x])[0]
  finally:
    runner.close()


def run(case: Case, tmp: str) -> Result:
  """Builds the case and checks both properties; never raises."""
  from graph_prune import errors  # pylint: disable=g-import-not-at-top
  from graph_prune import pipeline  # pylint: disable=g-import-not-at-top
  ext = ".onnx" if case.fmt == "onnx" else ".pb"
  src, out, dead_out = (os.path.join(tmp, f"{n}{ext}") for n in ("in", "out", "dead"))
  plan_path = os.path.join(tmp, "plan.json")
  blocks: tuple[str, ...] = ()
  try:
    built, dead, width = build(case, src)
    blocks = tuple(built)
    x = np.random.default_rng(case.seed + 1).standard_normal(
        (2, 3, 8, 8) if case.fmt == "onnx" else (2, 8, 8, 3)).astype(np.float32)
    before = _outputs(src, x)
    groups = 0
    try:
      doc = pipeline.prune(src, out, pipeline.Options(ratio=case.ratio, criterion=case.criterion,
                                                       seed=case.seed))
      groups = doc["groups_pruned"]
      if not doc.get("unchanged") and not doc["verify"]["passed"]:
        return Result(case, "failed", "verification reported failed", groups, blocks)
      after = _outputs(out, x)
      if after.shape != before.shape:
        return Result(case, "failed", f"output shape {after.shape} != {before.shape}", groups,
                      blocks)
    except errors.NothingToPruneError:
      pass
    # Planted dead channels: prune that layer alone, by exactly their fraction.
    doc = pipeline.prune(src, dead_out, pipeline.Options(
        ratio=0.0, criterion="l1", overrides=((DEAD_NODE, len(dead) / width),),
        plan_out=plan_path))
    with open(plan_path, encoding="utf-8") as f:
      plan = json.load(f)
    mine = [g for g in plan["groups"] if DEAD_NODE in g["sources"]]
    if len(mine) == 1 and mine[0]["sources"] == [DEAD_NODE]:
      removed = sorted(set(range(width)) - set(mine[0]["keep"]))
      if removed != dead:
        return Result(case, "failed", f"dead channels {dead}, removed {removed}", groups, blocks)
      after = _outputs(dead_out, x)
      scale = max(1.0, float(np.max(np.abs(before))))
      if float(np.max(np.abs(after - before))) > 1e-5 * scale:
        return Result(case, "failed", "removing dead channels changed the outputs by "
                      f"{float(np.max(np.abs(after - before))):.3g}", groups, blocks)
    return Result(case, "ok" if groups else "nothing", "", groups, blocks)
  except Exception as e:  # pylint: disable=broad-except  (every failure is reported, not raised)
    lines = traceback.format_exception(e)
    return Result(case, "failed", f"{type(e).__name__}: {e}".splitlines()[0][:300] + " | " +
                  "".join(lines[-3:]).replace("\n", " ")[:500], 0, blocks)


def cases(seed: int, count: int, formats=("onnx", "tf")) -> list[Case]:
  """`count` cases drawn from one seed: formats alternate, ONNX opsets 11 to 21."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(count):
    fmt = formats[i % len(formats)]
    out.append(Case(int(rng.integers(0, 2 ** 31)), fmt, int(rng.integers(11, 22)),
                    float(rng.choice([0.1, 0.25, 0.5, 0.75, 0.9])), str(rng.choice(CRITERIA))))
  return out


def from_json(text: str) -> Case:
  return Case(**json.loads(text))


def to_json(case: Case) -> str:
  return json.dumps(dataclasses.asdict(case), sort_keys=True)


def describe(result: Result) -> Optional[str]:
  if result.status != "failed":
    return None
  return f"{to_json(result.case)}  blocks={list(result.blocks)}  {result.detail}"
