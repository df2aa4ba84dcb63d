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
from typing import Mapping, Optional

import numpy as np

from graph_prune import errors
from graph_prune.adapters import tf_model
from graph_prune.adapters import tf_trainable
from graph_prune.graph import view
from graph_prune.ops import tf_ops
from graph_prune.recover import calibrate


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


def _mean(w: tf_model.NodeWriter, name: str, tensor: str, axes: str) -> str:
  """A float32 mean over `axes`, the dimensions kept."""
  return w.add(name, "Mean", (tensor, axes), T=tf_model.FLOAT32, Tidx=tf_model.INT32,
               keep_dims=tf_model.attr(b=True))


def sites(pruned: tf_model.TFModel, logits: str, graph: Optional[view.GraphView] = None
          ) -> tuple[list[calibrate.Site], list[int], list[str]]:
  """The affine sites that get a normalisation, their tensors' ranks, and why the
  others do not. `graph`: the model's view, when the caller has it."""
  graph = graph or tf_model.to_view(pruned)
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


def insert(pruned: tf_model.TFModel, logits: str, x: np.ndarray,
           graph: Optional[view.GraphView] = None) -> Training:
  """The training graph; `x`: the calibration inputs the new scales and offsets start
  from (each channel's standard deviation and mean on them); `graph`: the pruned
  model's view, when the caller has it."""
  chosen, ranks, skipped = sites(pruned, logits, graph)
  if not chosen:
    raise errors.UsageError("--recover_batch_stats: the model has no per-channel shift after "
                            "a linear layer (a folded batch norm) to normalise"
                            + (f"; {skipped[0]}" if skipped else ""))
  w = tf_model.NodeWriter(pruned, _PREFIX)
  teacher = tf_trainable.Trainable(pruned, trainable=())
  stats = calibrate.moments(teacher, [s.tensor for s in chosen], [s.axis for s in chosen], x)
  t = tf_model.FLOAT32
  normalised, points = {}, []
  for k, (site, rank, (mean, std)) in enumerate(zip(chosen, ranks, stats)):
    ref = _ref(site.tensor)
    shape = [1] * rank
    shape[site.axis] = -1
    axes = w.const(f"{k}/axes", np.array([a for a in range(rank) if a != site.axis], np.int32))
    centred = w.add(f"{k}/centred", "Sub", (ref, _mean(w, f"{k}/mean", ref, axes)), T=t)
    square = w.add(f"{k}/square", "Square", (centred,), T=t)
    var_b = _mean(w, f"{k}/variance", square, axes)
    eps = w.const(f"{k}/epsilon", np.float32(EPSILON))
    inv = w.add(f"{k}/rsqrt", "Rsqrt", (w.add(f"{k}/add_epsilon", "AddV2", (var_b, eps), T=t),),
                T=t)
    gamma = w.const(f"{k}/gamma", np.sqrt(std ** 2 + EPSILON).astype(np.float32).reshape(shape))
    beta = w.const(f"{k}/beta", mean.astype(np.float32).reshape(shape))
    scaled = w.add(f"{k}/scaled", "Mul", (centred, w.add(f"{k}/factor", "Mul", (inv, gamma),
                                                          T=t)), T=t)
    normalised[ref] = normalised[site.tensor] = w.add(f"{k}/out", "AddV2", (scaled, beta), T=t)
    points.append(Point(site, gamma + ":0", beta + ":0"))
  for node in w.graph_def.node:  # the readers of a site's output read the normalised tensor
    if not node.name.startswith(_PREFIX):
      node.input[:] = [normalised.get(i, i) for i in node.input]
  return Training(w.model(), tuple(points), tuple(skipped))


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
