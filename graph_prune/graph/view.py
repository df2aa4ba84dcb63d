"""A framework-neutral view of a model graph.

Format adapters build it; analysis, criteria and rewrite read it. It imports
neither TensorFlow nor ONNX. Tensors are named by strings the adapter chooses
("node:0" for TensorFlow); constants are numpy arrays keyed by tensor name.
The view is read-only by convention: transforms produce edits, never mutate it.
"""

from __future__ import annotations

import dataclasses
import types
from typing import Any, Mapping, Optional, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Node:
  """One operation: its inputs and outputs are tensor names.

  `captures` are the outer-scope tensors that the node's subgraphs (ONNX If,
  Loop, Scan bodies) read by name: edges like the inputs, but with no input
  slot of their own. A consumer reads a capture at index len(inputs) + k.
  """
  name: str
  op: str
  inputs: tuple[str, ...]
  outputs: tuple[str, ...]
  attrs: Mapping[str, Any] = dataclasses.field(
      default_factory=lambda: types.MappingProxyType({}))
  captures: tuple[str, ...] = ()
  # Non-empty for a node that runs inside a loop body (a TensorFlow while-loop
  # frame): its channels are never pruned, as a loop may run zero times on the
  # oracle's inputs.
  loop: str = ""


# A static shape: a tuple of ints, with None for an unknown dimension.
Shape = tuple[Optional[int], ...]


class GraphView:
  """Nodes in topological order, constants, static shapes, graph inputs/outputs."""

  def __init__(self, nodes: Sequence[Node], constants: Mapping[str, np.ndarray],
               shapes: Mapping[str, Optional[Shape]], inputs: Sequence[str],
               outputs: Sequence[str], layout: str,
               dtypes: Optional[Mapping[str, str]] = None, opset: int = 0):
    self.nodes: tuple[Node, ...] = tuple(nodes)
    self.constants: Mapping[str, np.ndarray] = types.MappingProxyType(dict(constants))
    self.shapes: Mapping[str, Optional[Shape]] = types.MappingProxyType(dict(shapes))
    self.inputs: tuple[str, ...] = tuple(inputs)
    self.outputs: tuple[str, ...] = tuple(outputs)
    # "NHWC" or "NCHW": the layout the adapter found for the model, decided once.
    self.layout = layout
    # numpy dtype names of tensors, where the adapter knows them (graph inputs at least).
    self.dtypes: Mapping[str, str] = types.MappingProxyType(dict(dtypes or {}))
    # The version of the op set the nodes follow (ONNX: the default domain's
    # opset; 0 for TensorFlow), which op descriptions are looked up by.
    self.opset = opset
    self._by_name = {n.name: n for n in self.nodes}
    self._producer = {}
    self._consumers: dict[str, list[tuple[Node, int]]] = {}
    for node in self.nodes:
      for t in node.outputs:
        self._producer[t] = node
      for i, t in enumerate(node.inputs + node.captures):
        self._consumers.setdefault(t, []).append((node, i))

  def node(self, name: str) -> Node:
    return self._by_name[name]

  def producer(self, tensor: str) -> Optional[Node]:
    return self._producer.get(tensor)

  def consumers(self, tensor: str) -> list[tuple[Node, int]]:
    """(node, input index) pairs that read `tensor`."""
    return list(self._consumers.get(tensor, ()))

  def copied_from(self, tensor: str) -> list[str]:
    """`tensor` and, through Identity nodes, each tensor it is a copy of, nearest first."""
    chain = [tensor]
    node = self.producer(tensor)
    while node is not None and node.op == "Identity" and node.inputs:
      chain.append(node.inputs[0])
      node = self.producer(node.inputs[0])
    return chain

  def is_const(self, tensor: str) -> bool:
    return tensor in self.constants

  def shape(self, tensor: str) -> Optional[Shape]:
    if tensor in self.constants:
      return tuple(self.constants[tensor].shape)
    return self.shapes.get(tensor)

  def rank(self, tensor: str) -> Optional[int]:
    s = self.shape(tensor)
    return None if s is None else len(s)
