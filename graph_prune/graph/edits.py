"""Edits to a graph's constants, as the rewrite produces them and adapters apply them."""

from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np


@dataclasses.dataclass(frozen=True)
class Edits:
  constants: Mapping[str, np.ndarray]                  # const tensor -> new value
  new_constants: Mapping[str, tuple[str, np.ndarray]]  # new name -> (copied const, value)
  rewires: tuple[tuple[str, int, str], ...]            # (node, input index, new name)
  # (node, attribute, new value: an int, or a tuple of ints for a list attribute)
  attrs: tuple[tuple[str, str, object], ...] = ()
  # How a value in `constants` or `new_constants` came from its original, where it
  # is the original with some channels cut or zeroed and nothing else:
  # name -> (mode, ((axis, keep mask), ...)), mode "slice" (np.compress) or
  # "mask" (zeroed where keep is False). An adapter that stores a constant in
  # another form (an ONNX weight as int8 codes and scales) applies the same cuts
  # to that form; a value without an entry was computed (reconstruction).
  selections: Mapping[str, tuple[str, tuple[tuple[int, np.ndarray], ...]]] = (
      dataclasses.field(default_factory=dict))
  # Nodes removed (a residual branch and its addition, --mode=layer), applied after
  # the rewires; constants that only they read go with them.
  drop: tuple[str, ...] = ()

  @property
  def empty(self) -> bool:
    return not (self.constants or self.new_constants or self.rewires or self.attrs or self.drop)
