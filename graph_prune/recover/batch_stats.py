"""Recovery training with batch statistics, folded back into the constants at the end.

A frozen graph holds its batch norms folded into the constants of the layer before
them (grappler: a convolution with scaled weights and a per-channel shift, or a
MatMul, a per-channel Mul and a shift). Training those constants is training a
network without normalisation, which trains worse than the same network with it:
on the built-in model at ratio 0.75, fine-tuning the folded graph reached 91.37 %,
with this module 91.76 % (README).

So, for training only, a normalisation by the batch's own statistics is inserted
after every per-channel shift that follows a linear layer (calibrate.find_sites),
with a scale and an offset of its own that start at the channel's standard
deviation and mean on calibration data, so that training starts from the model as
it is. Not normalised: the layer producing the logits (the output, or the input of
its Softmax, through Identity nodes), and a site whose constants other ops read
too (folding would change them for those as well). At the end every one is folded
back into its site's constants (calibrate.rescaled) with the trained model's own
statistics on the calibration data, layer by layer in graph order with the layers
before it already folded (precise batch norm, rather than running averages): the
result has exactly the pruned graph's ops, and on the calibration set taken as one
batch it computes what the training graph computes.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np

from graph_prune import errors
from graph_prune.adapters import tf_model
from graph_prune.adapters import tf_trainable
from graph_prune.ops import tf_ops
from graph_prune.recover import calibrate

tf = tf_model.tf

EPSILON = 1e-3   # Keras' batch-norm epsilon
_PREFIX = "graph_prune_batch_stats"


@dataclasses.dataclass(frozen=True)
class Point:
  """A normalisation inserted after an affine site, and its two new constants."""
  site: calibrate.Site
  gamma: str
  beta: str


@dataclasses.dataclass(frozen=True)
class Training:
  """The pruned graph with normalisations by batch statistics, for training."""
  model: tf_model.TFModel
  points: tuple[Point, ...]
  skipped: tuple[str, ...]

  @property
  def constants(self) -> tuple[str, ...]:
    """The new scales and offsets."""
    return tuple(c for p in self.points for c in (p.gamma, p.beta))

  def weights(self, pruned: tf_model.TFModel) -> tuple[str, ...]:
    """The pruned graph's constants that training changes: its weights and every
    site's constants (a one-channel shift is not among the weights)."""
    return tuple(sorted(set(tf_trainable.weight_constants(pruned)) | {
        c for p in self.points for c in calibrate.constants(p.site)}))


def _ref(tensor: str) -> str:
  """A tensor name as a NodeDef input names it."""
  node, index = tensor.rsplit(":", 1)
  return node if index == "0" else tensor


def _attr(**kw):
  return tf.compat.v1.AttrValue(**kw)


def _add(graph_def, name: str, op: str, inputs, **attrs) -> str:
  node = graph_def.node.add(name=name, op=op, input=list(inputs))
  for key, value in attrs.items():
    node.attr[key].CopyFrom(value)
  return name


def _const(graph_def, name: str, value: np.ndarray) -> str:
  tensor = tf.make_tensor_proto(value)
  return _add(graph_def, name, "Const", (), dtype=_attr(type=tensor.dtype), value=_attr(
      tensor=tensor))


def _mean(graph_def, name: str, tensor: str, axes: str) -> str:
  """A float32 mean over `axes`, the dimensions kept."""
  return _add(graph_def, name, "Mean", (tensor, axes), T=_attr(type=tf.float32.as_datatype_enum),
              Tidx=_attr(type=tf.int32.as_datatype_enum), keep_dims=_attr(b=True))


def sites(pruned: tf_model.TFModel, logits: str) -> tuple[list[calibrate.Site], list[int],
                                                          list[str]]:
  """The affine sites that get a normalisation, their tensors' ranks, and why the
  others do not."""
  graph = tf_model.to_view(pruned)
  found, skipped = calibrate.find_sites(graph, tf_ops.REGISTRY)
  top = {n.name for n in pruned.graph_def.node}
  ends = {c for t in (logits, *pruned.outputs) for c in graph.copied_from(t)}
  chosen, ranks = [], []
  for site in found:
    if site.kind != "affine":
      skipped.append(f"{site.node}: a batch-norm op, trained as it is")
    elif site.tensor in ends:
      skipped.append(f"{site.node}: produces the logits")
    elif any(len(graph.consumers(c)) > 1 for c in calibrate.constants(site)):
      skipped.append(f"{site.node}: its constants are read by other ops too")
    elif site.tensor.split(":")[0] not in top:
      skipped.append(f"{site.node}: inside a function")
    elif graph.rank(site.tensor) is None or graph.constants[site.shift].dtype != np.float32:
      skipped.append(f"{site.node}: not a float32 tensor of known rank")
    else:
      chosen.append(site)
      ranks.append(graph.rank(site.tensor))
  return chosen, ranks, skipped


def insert(pruned: tf_model.TFModel, logits: str, x: np.ndarray) -> Training:
  """The training graph; `x`: the calibration inputs the new scales and offsets start
  from (each channel's standard deviation and mean on them)."""
  chosen, ranks, skipped = sites(pruned, logits)
  if not chosen:
    raise errors.UsageError("--recover_batch_stats: the model has no per-channel shift after "
                            "a linear layer (a folded batch norm) to normalise"
                            + (f"; {skipped[0]}" if skipped else ""))
  if any(n.name.startswith(_PREFIX) for n in pruned.graph_def.node):
    raise errors.InputError(f"the model already has nodes named {_PREFIX}/...")
  teacher = tf_trainable.Trainable(pruned, trainable=())
  stats = calibrate.moments(teacher, [s.tensor for s in chosen], [s.axis for s in chosen], x)
  gd = tf.compat.v1.GraphDef()
  gd.CopyFrom(pruned.graph_def)
  t = _attr(type=tf.float32.as_datatype_enum)
  normalised, points = {}, []
  for k, (site, rank, (mean, std)) in enumerate(zip(chosen, ranks, stats)):
    p = f"{_PREFIX}/{k}"
    ref = _ref(site.tensor)
    normalised[ref] = normalised[site.tensor] = f"{p}/out"
    shape = [1] * rank
    shape[site.axis] = -1
    axes = _const(gd, f"{p}/axes", np.array([a for a in range(rank) if a != site.axis],
                                               np.int32))
    centred = _add(gd, f"{p}/centred", "Sub", (ref, _mean(gd, f"{p}/mean", ref, axes)), T=t)
    square = _add(gd, f"{p}/square", "Square", (centred,), T=t)
    var_b = _mean(gd, f"{p}/variance", square, axes)
    eps = _const(gd, f"{p}/epsilon", np.float32(EPSILON))
    inv = _add(gd, f"{p}/rsqrt", "Rsqrt", (_add(gd, f"{p}/add_epsilon", "AddV2",
                                                 (var_b, eps), T=t),), T=t)
    gamma = _const(gd, f"{p}/gamma", np.sqrt(std ** 2 + EPSILON).astype(np.float32)
                   .reshape(shape))
    beta = _const(gd, f"{p}/beta", mean.astype(np.float32).reshape(shape))
    scaled = _add(gd, f"{p}/scaled", "Mul", (centred, _add(gd, f"{p}/factor", "Mul",
                                                           (inv, gamma), T=t)), T=t)
    _add(gd, f"{p}/out", "AddV2", (scaled, beta), T=t)
    points.append(Point(site, gamma + ":0", beta + ":0"))
  for node in gd.node:  # the readers of a site's output read the normalised tensor
    if not node.name.startswith(_PREFIX):
      node.input[:] = [normalised.get(i, i) for i in node.input]
  return Training(dataclasses.replace(pruned, graph_def=gd), tuple(points), tuple(skipped))


def fold(pruned: tf_model.TFModel, training: Training, values: Mapping[str, np.ndarray],
         x: np.ndarray) -> tf_model.TFModel:
  """The pruned graph with the trained `values` (of the training graph's constants),
  each normalisation folded into its site with the statistics on `x` of the model
  folded so far."""
  names = training.weights(pruned)
  student = tf_trainable.Trainable(pruned, trainable=names)
  student.assign({n: values[n] for n in names})
  for point in training.points:
    site = point.site
    mean, std = calibrate.moments(student, [site.tensor], [site.axis], x)[0]
    a = values[point.gamma].reshape(-1).astype(np.float64) / np.sqrt(std ** 2 + EPSILON)
    c = values[point.beta].reshape(-1).astype(np.float64) - a * mean
    student.assign(calibrate.rescaled(student.values(calibrate.constants(site)), site, a, c))
  return student.model()
