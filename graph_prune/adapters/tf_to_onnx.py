"""TensorFlow -> ONNX export of a (pruned) TensorFlow model with tf2onnx."""

from __future__ import annotations

from graph_prune import errors
from graph_prune.adapters import onnx_model
from graph_prune.adapters import tf_model

DEFAULT_OPSET = 17


def export(model: tf_model.TFModel, opset: int = DEFAULT_OPSET) -> onnx_model.ONNXModel:
  """Converts the model's GraphDef; ONNX inputs and outputs keep the TF tensor names."""
  import tf2onnx  # pylint: disable=g-import-not-at-top
  try:
    proto, _ = tf2onnx.convert.from_graph_def(
        model.graph_def, input_names=list(model.inputs), output_names=list(model.outputs),
        opset=opset)
  except Exception as e:  # tf2onnx raises many types for ops it cannot convert.
    raise errors.UsageError(f"tf2onnx could not convert the pruned model "
                            f"({str(e).splitlines()[0][:200]}); try another --opset") from None
  inits = {t.name for t in proto.graph.initializer}
  return onnx_model.ONNXModel(
      proto, tuple(i.name for i in proto.graph.input if i.name not in inits),
      tuple(o.name for o in proto.graph.output))
