"""TensorFlow -> LiteRT: the pruned frozen graph converted by TensorFlow's own
TFLite converter, in float32, with float16 weights, or full-integer int8 (weights
and activations; ranges from a representative dataset), inputs and outputs kept
float32 so the model is fed as before."""

from __future__ import annotations

from typing import Optional

import numpy as np
import tensorflow as tf

from graph_prune import errors
from graph_prune.adapters import tf_model
from graph_prune.adapters import tflite_model

SCHEMES = ("float32", "float16", "int8")


def convert(model: tf_model.TFModel, scheme: str = "float32",
            representative: Optional[np.ndarray] = None) -> tflite_model.TFLiteModel:
  """The model as a LiteRT flatbuffer; `representative` (samples of the one input)
  is needed for int8."""
  if scheme not in SCHEMES:
    raise errors.UsageError(f"--out_format=tflite takes --quantize=float16 or int8 (or none), "
                            f"not {scheme}")
  fn, _ = tf_model.concrete_function(model.graph_def, list(model.inputs), list(model.outputs))
  converter = tf.lite.TFLiteConverter.from_concrete_functions([fn])
  if scheme == "float16":
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.target_spec.supported_types = [tf.float16]
  elif scheme == "int8":
    if representative is None or not len(representative):
      raise errors.UsageError("--out_format=tflite --quantize=int8 needs calibration samples")

    def samples():
      for i in range(len(representative)):
        yield [representative[i:i + 1]]
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = samples
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
  try:
    content = converter.convert()
  except Exception as e:  # pylint: disable=broad-except  (the converter raises many types)
    lines = [l for l in str(e).splitlines() if "error" in l.lower()] or str(e).splitlines()
    raise errors.UsageError(f"the TFLite converter could not convert the pruned model "
                            f"({(lines or [type(e).__name__])[0].strip()[:300]})") from None
  return tflite_model.from_bytes(content, "the converted model")
