"""ONNX graphs as JAX functions, for timing them under XLA (benchmarks/gpu_xla.py).

A translation of exactly the ops the benchmarked CNNs hold (tf2onnx
conversions of Keras applications, and their pruned versions); an op or
attribute outside it is refused, never approximated. ONNX convolutions are
NCHW/OIHW and are translated as such; XLA's layout assignment chooses the
layouts the device's kernels prefer. Shape arithmetic (Shape, Gather, Slice,
Concat, Cast on constants) stays in numpy, so it is static under jit; float
initializers are the traced weights, passed as arguments, never folded into
the program as constants.

`load` reads a graph written by benchmarks/gpu_xla_prepare.py, whose large
initializers carry no values, and refills them with seeded random values.

Needs numpy and onnx; JAX is imported only when a graph is evaluated.
"""

import numpy as np

STRIPPED = "STRIPPED"  # external-data location gpu_xla_prepare.py gives a stripped initializer


class UnsupportedError(ValueError):
  """The graph holds an op or attribute this evaluator does not translate."""


def _fan_in(graph):
  """Initializer name -> fan-in, for the weight inputs of Conv, Gemm and MatMul."""
  shapes = {t.name: tuple(t.dims) for t in graph.initializer}
  fan = {}
  for node in graph.node:
    if len(node.input) < 2 or node.input[1] not in shapes:
      continue
    shape = shapes[node.input[1]]
    attrs = {a.name: a for a in node.attribute}
    if node.op_type == "Conv":
      fan[node.input[1]] = int(np.prod(shape[1:]))
    elif node.op_type == "Gemm":
      fan[node.input[1]] = shape[1] if attrs.get("transB") and attrs["transB"].i else shape[0]
    elif node.op_type == "MatMul":
      fan[node.input[1]] = shape[-2]
  return fan


def load(path, seed):
  """(ModelProto with every initializer's values, number of values refilled)."""
  import onnx  # pylint: disable=g-import-not-at-top
  from onnx import helper, numpy_helper  # pylint: disable=g-import-not-at-top
  model = onnx.load(path, load_external_data=False)
  fan = _fan_in(model.graph)
  rng = np.random.default_rng(seed)
  refilled = 0
  for t in model.graph.initializer:
    if t.data_location != onnx.TensorProto.EXTERNAL:
      continue
    location = {e.key: e.value for e in t.external_data}.get("location")
    if location != STRIPPED:
      raise UnsupportedError(f"{t.name}: external data at {location!r}; expected {STRIPPED!r} "
                             "from gpu_xla_prepare.py")
    dtype = helper.tensor_dtype_to_np_dtype(t.data_type)
    std = np.sqrt(2.0 / fan[t.name]) if t.name in fan else 0.1
    value = (rng.standard_normal(tuple(t.dims), dtype=np.float32) * np.float32(std)).astype(dtype)
    t.CopyFrom(numpy_helper.from_array(value, t.name))
    refilled += value.size
  return model, refilled


def _attrs(node):
  from onnx import helper  # pylint: disable=g-import-not-at-top
  return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _check_attrs(node, attrs, allowed):
  unknown = set(attrs) - set(allowed)
  if unknown:
    raise UnsupportedError(f"{node.op_type} {node.name}: attributes {sorted(unknown)} not supported")


def _pads(node, attrs, spatial, kernel, strides, dilations, in_shape):
  """[(begin, end)] per spatial axis from pads or auto_pad."""
  auto = attrs.get("auto_pad", b"NOTSET")
  auto = auto.decode() if isinstance(auto, bytes) else auto
  if auto in ("NOTSET", "VALID"):
    p = list(attrs.get("pads", [0] * 2 * spatial)) if auto == "NOTSET" else [0] * 2 * spatial
    return [(p[i], p[i + spatial]) for i in range(spatial)]
  if auto in ("SAME_UPPER", "SAME_LOWER"):
    out = []
    for i in range(spatial):
      size = in_shape[2 + i]
      total = max(0, (-(-size // strides[i]) - 1) * strides[i]
                  + (kernel[i] - 1) * dilations[i] + 1 - size)
      small, big = total // 2, total - total // 2
      out.append((small, big) if auto == "SAME_UPPER" else (big, small))
    return out
  raise UnsupportedError(f"{node.op_type} {node.name}: auto_pad {auto}")


class Evaluator:
  """An ONNX graph as a jax function of (weights, input).

  Integer initializers (shapes, axes, pads) stay numpy constants so that the
  ops that need them static (Reshape, Squeeze, Pad) see concrete values; float
  initializers are the function's traced weights.
  """

  def __init__(self, model, extra_outputs=()):
    from onnx import numpy_helper  # pylint: disable=g-import-not-at-top
    graph = model.graph
    self.nodes = list(graph.node)
    unknown = sorted({n.op_type for n in self.nodes if n.op_type not in _OPS})
    if unknown:
      raise UnsupportedError(f"ops without a translation: {', '.join(unknown)}")
    if any(n.domain not in ("", "ai.onnx") for n in self.nodes):
      raise UnsupportedError("nodes outside the default ONNX domain")
    arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    self.weights = {k: v for k, v in arrays.items() if v.dtype.kind == "f"}
    self.static = {k: v for k, v in arrays.items() if v.dtype.kind != "f"}
    inputs = [i for i in graph.input if i.name not in arrays]
    if len(inputs) != 1:
      raise UnsupportedError(f"{len(inputs)} graph inputs; one expected")
    self.input_name = inputs[0].name
    self.input_shape = [d.dim_value or None for d in inputs[0].type.tensor_type.shape.dim]
    self.outputs = [o.name for o in graph.output] + list(extra_outputs)
    self.op_counts = {}
    for n in self.nodes:
      self.op_counts[n.op_type] = self.op_counts.get(n.op_type, 0) + 1

  def __call__(self, weights, x):
    env = dict(self.static)
    env.update(weights)
    env[self.input_name] = x
    for node in self.nodes:
      args = [env[i] if i else None for i in node.input]
      results = _OPS[node.op_type](node, _attrs(node), *args)
      if not isinstance(results, tuple):
        results = (results,)
      for name, value in zip(node.output, results):
        env[name] = value
    return tuple(env[o] for o in self.outputs)


def _conv(node, attrs, x, w, b=None):
  from jax import lax  # pylint: disable=g-import-not-at-top
  _check_attrs(node, attrs, ("auto_pad", "dilations", "group", "kernel_shape", "pads", "strides"))
  spatial = w.ndim - 2
  strides = list(attrs.get("strides", [1] * spatial))
  dilations = list(attrs.get("dilations", [1] * spatial))
  pads = _pads(node, attrs, spatial, list(w.shape[2:]), strides, dilations, x.shape)
  names = {1: ("NCH", "OIH", "NCH"), 2: ("NCHW", "OIHW", "NCHW")}[spatial]
  y = lax.conv_general_dilated(x, w, strides, pads, rhs_dilation=dilations,
                               dimension_numbers=names,
                               feature_group_count=attrs.get("group", 1))
  return y if b is None else y + b.reshape((1, -1) + (1,) * spatial)


def _max_pool(node, attrs, x):
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax import lax  # pylint: disable=g-import-not-at-top
  _check_attrs(node, attrs, ("auto_pad", "ceil_mode", "dilations", "kernel_shape", "pads",
                             "storage_order", "strides"))
  if attrs.get("ceil_mode", 0) or any(d != 1 for d in attrs.get("dilations", [])):
    raise UnsupportedError(f"MaxPool {node.name}: ceil_mode or dilations")
  if len(node.output) > 1 and node.output[1]:
    raise UnsupportedError(f"MaxPool {node.name}: indices output")
  kernel = list(attrs["kernel_shape"])
  spatial = len(kernel)
  strides = list(attrs.get("strides", [1] * spatial))
  pads = _pads(node, attrs, spatial, kernel, strides, [1] * spatial, x.shape)
  return lax.reduce_window(x, -jnp.inf, lax.max, (1, 1, *kernel), (1, 1, *strides),
                           [(0, 0), (0, 0)] + pads)


def _average_pool(node, attrs, x):
  from jax import lax  # pylint: disable=g-import-not-at-top
  _check_attrs(node, attrs, ("auto_pad", "ceil_mode", "count_include_pad", "kernel_shape", "pads",
                             "strides"))
  kernel = list(attrs["kernel_shape"])
  spatial = len(kernel)
  strides = list(attrs.get("strides", [1] * spatial))
  pads = _pads(node, attrs, spatial, kernel, strides, [1] * spatial, x.shape)
  if attrs.get("ceil_mode", 0) or (any(p != (0, 0) for p in pads)
                                   and not attrs.get("count_include_pad", 0)):
    raise UnsupportedError(f"AveragePool {node.name}: ceil_mode or padding excluded from the count")
  total = lax.reduce_window(x, 0.0, lax.add, (1, 1, *kernel), (1, 1, *strides),
                            [(0, 0), (0, 0)] + pads)
  return total / float(np.prod(kernel))


def _static(node, value, what):
  if value is None:
    return None
  if not isinstance(value, np.ndarray):
    raise UnsupportedError(f"{node.op_type} {node.name}: {what} is computed, not a constant")
  return [int(v) for v in value.reshape(-1)]


def _reshape(node, attrs, x, shape):
  _check_attrs(node, attrs, ("allowzero",))
  shape = _static(node, shape, "shape")
  if attrs.get("allowzero", 0) and 0 in shape:
    raise UnsupportedError(f"Reshape {node.name}: allowzero with a zero in shape")
  shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
  return x.reshape(shape)


def _flatten(node, attrs, x):
  axis = attrs.get("axis", 1) % (x.ndim or 1)
  return x.reshape((int(np.prod(x.shape[:axis])), -1))


def _gemm(node, attrs, a, b, c=None):
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  _check_attrs(node, attrs, ("alpha", "beta", "transA", "transB"))
  if attrs.get("transA", 0):
    a = a.T
  if attrs.get("transB", 0):
    b = b.T
  y = jnp.matmul(a, b)
  if attrs.get("alpha", 1.0) != 1.0:
    y = y * attrs["alpha"]
  if c is not None:
    y = y + (c * attrs["beta"] if attrs.get("beta", 1.0) != 1.0 else c)
  return y


def _reduce_mean(node, attrs, x, axes=None):
  _check_attrs(node, attrs, ("axes", "keepdims", "noop_with_empty_axes"))
  axes = _static(node, axes, "axes") if axes is not None else attrs.get("axes")
  if not axes:
    if attrs.get("noop_with_empty_axes", 0):
      return x
    axes = list(range(x.ndim))
  return x.mean(axis=tuple(a % x.ndim for a in axes), keepdims=bool(attrs.get("keepdims", 1)))


def _squeeze(node, attrs, x, axes=None):
  axes = _static(node, axes, "axes") if axes is not None else attrs.get("axes")
  if axes is None:
    return x.squeeze()
  return x.squeeze(axis=tuple(a % x.ndim for a in axes))


def _unsqueeze(node, attrs, x, axes=None):
  axes = _static(node, axes, "axes") if axes is not None else attrs.get("axes")
  out_rank = x.ndim + len(axes)
  return _np(x).expand_dims(x, tuple(sorted(a % out_rank for a in axes)))


def _pad(node, attrs, x, pads, value=None, axes=None):
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  mode = attrs.get("mode", b"constant")
  mode = mode.decode() if isinstance(mode, bytes) else mode
  if mode != "constant" or axes is not None:
    raise UnsupportedError(f"Pad {node.name}: mode {mode} or axes")
  pads = _static(node, pads, "pads")
  n = x.ndim
  fill = 0.0 if value is None else value.reshape(())
  return jnp.pad(x, [(pads[i], pads[i + n]) for i in range(n)], constant_values=fill)


def _softmax(node, attrs, x):
  import jax  # pylint: disable=g-import-not-at-top
  return jax.nn.softmax(x, axis=attrs.get("axis", -1))


def _batch_norm(node, attrs, x, scale, bias, mean, var):
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  _check_attrs(node, attrs, ("epsilon", "momentum", "training_mode"))
  if attrs.get("training_mode", 0):
    raise UnsupportedError(f"BatchNormalization {node.name}: training mode")
  shape = (1, -1) + (1,) * (x.ndim - 2)
  k = scale / jnp.sqrt(var + attrs.get("epsilon", 1e-5))
  return x * k.reshape(shape) + (bias - mean * k).reshape(shape)


def _np(*xs):
  """numpy where every input is a numpy constant (shape arithmetic stays static), else jax.numpy."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  return np if all(isinstance(x, np.ndarray) for x in xs if x is not None) else jnp


def _concat(node, attrs, *xs):
  return _np(*xs).concatenate(xs, axis=attrs["axis"])


def _shape(node, attrs, x):
  _check_attrs(node, attrs, ())
  return np.array(x.shape, dtype=np.int64)  # shapes are static under jit


def _gather(node, attrs, x, indices):
  xnp = _np(x, indices)
  out = xnp.take(x, indices, axis=attrs.get("axis", 0))
  return np.asarray(out) if xnp is np else out


def _slice(node, attrs, x, starts, ends, axes=None, steps=None):
  starts, ends = _static(node, starts, "starts"), _static(node, ends, "ends")
  axes = _static(node, axes, "axes") or list(range(len(starts)))
  steps = _static(node, steps, "steps") or [1] * len(starts)
  index = [slice(None)] * x.ndim
  for axis, start, end, step in zip(axes, starts, ends, steps):
    index[axis % x.ndim] = slice(start, end, step)  # Python clamps as ONNX does
  return x[tuple(index)]


def _cast(node, attrs, x):
  from onnx import helper  # pylint: disable=g-import-not-at-top
  return x.astype(helper.tensor_dtype_to_np_dtype(attrs["to"]))


def _elementwise(fn):
  def op(node, attrs, a, b):
    _check_attrs(node, attrs, ())
    out = fn(a, b)
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
      # numpy constants combine into numpy (shape arithmetic), keeping ONNX's dtype.
      return np.asarray(out).astype(a.dtype)
    return out
  return op


def _unary(fn):
  def op(node, attrs, x):
    _check_attrs(node, attrs, ())
    return fn(x)
  return op


def _transpose(node, attrs, x):
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  return jnp.transpose(x, attrs.get("perm"))


def _relu(x):
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  return jnp.maximum(x, 0)


def _sigmoid(x):
  import jax  # pylint: disable=g-import-not-at-top
  return jax.nn.sigmoid(x)


def _global_average_pool(node, attrs, x):
  return x.mean(axis=tuple(range(2, x.ndim)), keepdims=True)


_OPS = {
    "Add": _elementwise(lambda a, b: a + b),
    "AveragePool": _average_pool,
    "BatchNormalization": _batch_norm,
    "Cast": _cast,
    "Concat": _concat,
    "Conv": _conv,
    "Div": _elementwise(lambda a, b: a / b),
    "Flatten": _flatten,
    "Gather": _gather,
    "Gemm": _gemm,
    "GlobalAveragePool": _global_average_pool,
    "Identity": _unary(lambda x: x),
    "MatMul": _elementwise(lambda a, b: a @ b),
    "MaxPool": _max_pool,
    "Mul": _elementwise(lambda a, b: a * b),
    "Pad": _pad,
    "ReduceMean": _reduce_mean,
    "Relu": _unary(_relu),
    "Reshape": _reshape,
    "Shape": _shape,
    "Sigmoid": _unary(_sigmoid),
    "Slice": _slice,
    "Softmax": _softmax,
    "Squeeze": _squeeze,
    "Sub": _elementwise(lambda a, b: a - b),
    "Transpose": _transpose,
    "Unsqueeze": _unsqueeze,
}
