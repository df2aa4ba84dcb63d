"""Batch-norm recalibration without gradient steps.

Pruning removes inputs of every layer behind a pruned one, so the per-channel
statistics its normalisation was fitted to no longer hold. Two forms are handled:

- FusedBatchNorm in inference mode: its mean and variance constants are
  re-estimated from the pruned model's own activations on calibration data
  (gamma and beta kept), the classic recalibration.
- Batch norm folded into constants (grappler turns Keras batch norm into a
  convolution or MatMul, an optional per-channel Mul and a per-channel Add): the
  folded scale and shift of each kept channel are re-fitted so that the channel's
  mean and standard deviation on the calibration data equal those of the same
  channel in the original model.

Layers are corrected in graph order, each after the ones before it, since every
correction changes what the later layers see.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

from absl import logging
import numpy as np

from graph_prune import errors
from graph_prune.adapters import tf_model
from graph_prune.adapters import tf_trainable
from graph_prune.ops import affine
from graph_prune.ops import desc
from graph_prune.ops import tf_ops
from graph_prune.recover import data as data_lib
from graph_prune.recover import options as options_lib

tf = tf_model.tf

_EPS = 1e-12


@dataclasses.dataclass(frozen=True)
class Site:
  """A per-channel affine map to re-fit, or a batch norm to re-estimate."""
  kind: str                 # "affine" or "batchnorm"
  node: str                 # the linear op or the batch norm
  tensor: str               # affine: the shift's output; batchnorm: its input
  axis: int                 # channel axis of `tensor`
  weight: str = ""          # affine: the linear op's weight constant ...
  weight_axis: int = -1     # ... and its output-channel axis
  multiplier: int = 1       # depthwise channel multiplier
  scale: str = ""           # affine: the per-channel Mul constant, if any
  shift: str = ""           # affine: the per-channel Add constant
  mean: str = ""            # batchnorm: mean and variance constants
  variance: str = ""


def find_sites(graph, ops: desc.Registry) -> tuple[list[Site], list[str]]:
  """The sites of a graph view, in graph order, and why other linear ops are not.
  What is a linear layer or a batch norm, and where its weights and channels
  are, comes from the op descriptions."""
  sites, skipped = [], []
  for node in graph.nodes:
    norm = ops.norm(graph, node)
    if norm is not None:
      if node.attrs.get("is_training") or not all(
          t in graph.constants for t in (norm.scale, norm.shift, norm.mean, norm.variance)):
        skipped.append(f"{node.name}: batch norm in training mode or with non-constant inputs")
        continue
      sites.append(Site("batchnorm", node.name, node.inputs[0], norm.channel_axis,
                        mean=norm.mean, variance=norm.variance))
      continue
    lin = ops.linear(graph, node)
    if lin is None or lin.transposed:
      continue  # not a layer whose output channels map one-to-one to filters
    out = node.outputs[0]
    shape = graph.shape(out)
    if shape is None:
      skipped.append(f"{node.name}: unknown output shape")
      continue
    axis = lin.channel_axis % len(shape)
    channels = shape[axis]
    found = affine.after(graph, ops, out, channels)
    if not found.shift:
      skipped.append(f"{node.name}: no per-channel shift right after it to re-fit")
      continue
    sites.append(Site("affine", node.name, found.output, axis, lin.weight,
                      lin.out_axis, lin.multiplier, found.scale, found.shift))
  return sites, skipped


class _Stats:
  """Per-channel mean and standard deviation, accumulated over batches in float64."""

  def __init__(self):
    self.n, self.s, self.ss = 0, 0.0, 0.0

  def add(self, count, total, squares):
    self.n += count
    self.s = self.s + total
    self.ss = self.ss + squares

  def result(self) -> tuple[np.ndarray, np.ndarray]:
    mean = self.s / self.n
    return mean, np.sqrt(np.maximum(self.ss / self.n - mean * mean, 0.0))


def moments(trainable: tf_trainable.Trainable, tensors: list[str], axes: list[int],
            x: np.ndarray, batch: int = 256) -> list[tuple[np.ndarray, np.ndarray]]:
  """Per-channel (mean, standard deviation) of each of `tensors` (reduced over every
  axis but its channel axis in `axes`) as `trainable` computes them on all of `x`,
  accumulated batch by batch in float64."""
  @tf.function
  def fn(xb):
    res = []
    for t, axis in zip(trainable(xb, fetches=tensors), axes):
      red = [a for a in range(t.shape.rank) if a != axis]
      t = tf.cast(t, tf.float64)
      res.append((tf.cast(tf.reduce_prod(tf.gather(tf.shape(t), red)), tf.float64),
                  tf.reduce_sum(t, red), tf.reduce_sum(t * t, red)))
    return res

  stats = [_Stats() for _ in tensors]
  for i in range(0, len(x), batch):
    for st, (n, s, ss) in zip(stats, fn(tf.constant(x[i:i + batch]))):
      st.add(float(n), s.numpy(), ss.numpy())
  return [st.result() for st in stats]


def calibration_inputs(data: data_lib.Data, samples: int) -> np.ndarray:
  """The first `samples` training inputs (not the held-out ones)."""
  rows = data_lib.as_numpy(data.train.take(samples), data.spec)
  if not rows:
    raise errors.InputError(f"recovery data '{data.spec}' has no samples")
  return np.concatenate(rows)


def recalibrate(original: tf_model.TFModel, pruned: tf_model.TFModel,
                kept: Mapping[str, np.ndarray], data: data_lib.Data,
                options: options_lib.Options) -> tuple[tf_model.TFModel, dict]:
  x = calibration_inputs(data, options.calibration_samples)
  graph = tf_model.to_view(pruned)
  sites, skipped = find_sites(graph, tf_ops.REGISTRY)
  affine = [s for s in sites if s.kind == "affine"]
  # The original's statistics at every affine site, in one pass.
  target = {}
  if affine:
    teacher = tf_trainable.Trainable(original, trainable=())
    for site, (mean, std) in zip(affine, moments(teacher, [s.tensor for s in affine],
                                                 [s.axis for s in affine], x)):
      positions = kept.get(site.tensor)
      if positions is None:
        positions = np.arange(len(mean))
      target[site.tensor] = (mean[positions], std[positions])
  student = tf_trainable.Trainable(
      pruned, trainable=sorted({c for s in sites for c in constants(s)}))
  adjusted = 0
  for site in sites:
    mean_p, std_p = moments(student, [site.tensor], [site.axis], x)[0]
    values = student.values(constants(site))
    if site.kind == "batchnorm":
      shape = values[site.mean].shape
      student.assign({site.mean: mean_p.reshape(shape).astype(values[site.mean].dtype),
                      site.variance: (std_p ** 2).reshape(shape).astype(
                          values[site.variance].dtype)})
      adjusted += 1
      continue
    mean_o, std_o = target[site.tensor]
    if len(mean_o) != len(mean_p):
      skipped.append(f"{site.node}: {len(mean_p)} channels, original statistics for "
                     f"{len(mean_o)}")
      continue
    # z' = a * (z_p - mean_p) + mean_o keeps the linear part's shape: scale a per channel.
    a = np.where(std_p > _EPS, std_o / np.maximum(std_p, _EPS), 1.0)
    update = rescaled(values, site, a, mean_o - a * mean_p)
    student.assign(update)
    adjusted += 1
  logging.info("recover bn_recalibrate: %d of %d sites re-fitted on %d samples", adjusted,
               len(sites), len(x))
  return student.model(), {"calibration_samples": int(len(x)), "sites": len(sites),
                           "sites_adjusted": adjusted, "skipped": skipped[:20]}


def constants(site: Site) -> tuple[str, ...]:
  """The constants of a site."""
  return tuple(c for c in (site.weight, site.scale, site.shift, site.mean, site.variance) if c)


def rescaled(values: Mapping[str, np.ndarray], site: Site, a: np.ndarray,
             c: np.ndarray) -> dict[str, np.ndarray]:
  """New values of an affine site's constants that turn its output z into a * z + c
  per channel: the shift becomes a * shift + c, and the scale (or, without one, the
  linear op's weights) is multiplied by a."""
  shift = values[site.shift]
  b = shift.reshape(-1).astype(np.float64)
  update = {site.shift: (a * b + c).reshape(shift.shape).astype(shift.dtype)}
  if site.scale:
    s = values[site.scale]
    update[site.scale] = (s.reshape(-1) * a).reshape(s.shape).astype(s.dtype)
  else:
    w = values[site.weight]
    shape = [1] * w.ndim
    if site.multiplier > 1:  # depthwise [H, W, C, M]: output channel c * M + m
      factor = np.reshape(a, (w.shape[2], w.shape[3]))[np.newaxis, np.newaxis]
    else:
      shape[site.weight_axis] = -1
      factor = np.reshape(a, shape)
    update[site.weight] = (w * factor).astype(w.dtype)
  return update
