"""Latency of one convolution of a model across output widths, on this device.

  bazel run //tools:profile_widths -- --in=model.pb --layer=NODE [--widths=64:128]

Prints the staircase (width, median latency, bar) and the channel multiple it
favours, and keeps every figure in a latency table keyed by device, layer
shape and width (--cache), which --round_to=auto and later latency-budget
allocation read instead of measuring again. The layer is timed as an NHWC
convolution under XLA (--noxla for plain TensorFlow), whatever the model's
format.
"""

import sys

from absl import app
from absl import flags

from graph_prune import errors
from tools import cli

_IN = flags.DEFINE_string("in", None, "Model: .pb/.pbtxt, SavedModel directory or .onnx.")
_LAYER = flags.DEFINE_string("layer", None, "Name of a convolution node of the model.")
_WIDTHS = flags.DEFINE_string("widths", None, "LO:HI[:STEP] output widths (default C/2:C).")
_BATCH = flags.DEFINE_integer("batch", 1, "Batch size of the timed layer.")
_RUNS = flags.DEFINE_integer("runs", 20, "Timed runs per width (median reported).")
_XLA = flags.DEFINE_boolean("xla", True, "Compile with XLA.")
_CACHE = flags.DEFINE_string("cache", None, "Latency table (default: the user cache).")

flags.mark_flags_as_required(["in", "layer"])


def layer_of(path, name):
  """The Layer and output width of convolution `name` in the model at `path`
  (weights, kernel and strides as its op description gives them)."""
  from graph_prune import formats  # pylint: disable=g-import-not-at-top
  from graph_prune.bench import widths  # pylint: disable=g-import-not-at-top
  fmt = formats.for_path(path)
  graph = fmt.adapter.to_view(fmt.adapter.normalise(fmt.adapter.load(path)))

  def conv(node):
    lin = fmt.ops.linear(graph, node)
    ok = lin is not None and len(lin.kernel) == 2 and lin.groups == 1 and not lin.transposed
    return lin if ok else None

  try:
    node = graph.node(name)
  except KeyError:
    convs = [n.name for n in graph.nodes if conv(n)][:5]
    raise errors.UsageError(f"no node '{name}' in the model; convolutions include: "
                            f"{', '.join(convs)}") from None
  lin = conv(node)
  shape = graph.shape(node.inputs[0])
  if lin is None or shape is None or len(shape) != 4:
    raise errors.UsageError(f"'{name}' is a {node.op}, not an ungrouped 2-D convolution with "
                            "constant weights")
  axis = lin.channel_axis % 4
  h, wd = [shape[a] for a in range(1, 4) if a != axis]
  cin = shape[axis]
  if None in (h, wd, cin):
    raise errors.UsageError(f"'{name}' has an input of unknown spatial size")
  cout = graph.constants[lin.weight].shape[lin.out_axis]
  return (widths.Layer(int(h), int(wd), int(cin), int(lin.kernel[0]), int(lin.strides[0])),
          int(cout))


def _range(spec, cout):
  if spec is None:
    return list(range(max(1, cout // 2), cout + 1))
  try:
    parts = [int(v) for v in spec.split(":")]
    lo, hi, step = (parts + [1])[:3] if len(parts) >= 2 else (None, None, None)
    if lo is None or lo < 1 or hi < lo or step < 1:
      raise ValueError
  except ValueError:
    raise errors.UsageError(f"--widths '{spec}' is not LO:HI[:STEP] with 1 <= LO <= HI") from None
  return list(range(lo, hi + 1, step))


def main(argv):
  del argv
  from graph_prune.bench import widths  # pylint: disable=g-import-not-at-top
  try:
    layer, cout = layer_of(cli.path(flags.FLAGS["in"].value), _LAYER.value)
    width_list = _range(_WIDTHS.value, cout)
    cache = widths.Cache(cli.path(_CACHE.value) or widths.default_cache())
    latency = widths.profile(layer, width_list, cache, _XLA.value, _BATCH.value, _RUNS.value)
  except errors.GraphPruneError as e:
    print(f"profile_widths: error: {e}", file=sys.stderr)
    return 2
  top = max(latency.values())
  print(f"layer {_LAYER.value}: {layer.key}, {cout} channels; batch {_BATCH.value}, "
        f"{'XLA' if _XLA.value else 'TensorFlow'}, device {widths.device_key(_XLA.value)}")
  for w, ms in latency.items():
    print(f"{w:6d} {ms:10.3f} ms  {'#' * int(40 * ms / top)}")
  print(f"favoured multiple: {widths.favoured_multiple(latency)} (cache {cache.path})")
  return 0


if __name__ == "__main__":
  app.run(main)
