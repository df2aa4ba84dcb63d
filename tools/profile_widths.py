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
  """The Layer and output width of convolution `name` in the model at `path`."""
  from graph_prune import pipeline  # pylint: disable=g-import-not-at-top
  from graph_prune.bench import widths  # pylint: disable=g-import-not-at-top
  fmt = pipeline.format_for(path)
  graph = fmt.adapter.to_view(fmt.adapter.normalise(fmt.adapter.load(path)))
  try:
    node = graph.node(name)
  except KeyError:
    convs = [n.name for n in graph.nodes if n.op in ("Conv2D", "Conv")][:5]
    raise errors.UsageError(f"no node '{name}' in the model; convolutions include: "
                            f"{', '.join(convs)}") from None
  x, w = node.inputs[:2]
  shape, weight = graph.shape(x), graph.constants.get(w)
  if node.op not in ("Conv2D", "Conv") or weight is None or shape is None or len(shape) != 4:
    raise errors.UsageError(f"'{name}' is a {node.op}, not a convolution with constant weights")
  strides = node.attrs.get("strides") or (1, 1, 1, 1)
  if node.op == "Conv2D" and not node.attrs.get("data_format", "NHWC").startswith("NC"):
    h, wd, cin = shape[1], shape[2], shape[3]
    stride = strides[1]
  else:
    h, wd, cin = shape[2], shape[3], shape[1]
    stride = strides[2] if node.op == "Conv2D" else strides[0]
  kernel = weight.shape[0] if node.op == "Conv2D" else weight.shape[2]
  cout = weight.shape[3] if node.op == "Conv2D" else weight.shape[0]
  if None in (h, wd, cin):
    raise errors.UsageError(f"'{name}' has an input of unknown spatial size")
  return widths.Layer(int(h), int(wd), int(cin), int(kernel), int(stride)), int(cout)


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
