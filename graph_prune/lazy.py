"""Modules imported on first use, so that a command that fails on its flags, or asks for
--help, answers before TensorFlow (about 2.5 s) is imported.

  tf = lazy.module("tensorflow")   # imported at the first `tf.<name>`

Annotations that name such a module stay strings (`from __future__ import annotations`).
"""

import importlib
import types


class _Module:
  """Stands in for a module until an attribute of it is read."""

  def __init__(self, name: str):
    self._name = name

  def __getattr__(self, attr: str):
    # Only reached for names this object lacks, that is, the module's own.
    return getattr(importlib.import_module(self._name), attr)

  def __repr__(self) -> str:
    return f"<lazily imported module {self._name!r}>"


def module(name: str) -> types.ModuleType:
  """`name`, imported when one of its attributes is first read."""
  return _Module(name)  # type: ignore[return-value]
