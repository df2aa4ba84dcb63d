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

  @property
  def empty(self) -> bool:
    return not (self.constants or self.new_constants or self.rewires or self.attrs)
