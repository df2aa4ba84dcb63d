"""TensorFlow -> ONNX export of a (pruned) TensorFlow model with tf2onnx."""

from __future__ import annotations

import contextlib
import gc
import threading

from graph_prune import errors
from graph_prune.adapters import onnx_model
from graph_prune.adapters import tf_model

DEFAULT_OPSET = 17
GC_INTERVAL_S = 1.0


@contextlib.contextmanager
def collecting_garbage(interval_s: float):
  """Runs a full garbage collection every interval_s while the block runs.

  tf2onnx's optimizer deep-copies the graph for each of its passes; the copies
  are reference cycles holding every weight array, and they are few objects, so
  the generational collector seldom reaches them. On VGG16 at 224x224 (550 MB of
  weights) the copies took the conversion past 24 GB; collected as they go, it
  peaks below 10 GB.
  """
  done = threading.Event()

  def collect():
    while not done.wait(interval_s):
      gc.collect()

  thread = threading.Thread(target=collect, daemon=True, name="tf2onnx-gc")
  thread.start()
  try:
    yield
  finally:
    done.set()
    thread.join()


def export(model: tf_model.TFModel, opset: int = DEFAULT_OPSET) -> onnx_model.ONNXModel:
  """Converts the model's GraphDef; ONNX inputs and outputs keep the TF tensor names."""
  import tf2onnx  # pylint: disable=g-import-not-at-top
  try:
    with collecting_garbage(GC_INTERVAL_S):
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
