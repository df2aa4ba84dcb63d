"""--quantize=bfloat16 / float16 for a GraphDef or SavedModel kept for XLA.

Runs with TF_ENABLE_ONEDNN_OPTS=0 (see BUILD): without oneDNN TensorFlow's CPU has
no bfloat16 convolution, so the measurement and these checks run under XLA, as a
user without AVX-512 would.
"""

import os
import subprocess

import numpy as np
import tensorflow as tf
from absl.testing import absltest
from absl.testing import parameterized

from graph_prune import errors
from graph_prune import pipeline
from graph_prune.adapters import tf_model
from graph_prune.calibration import samples as samples_lib
from graph_prune.data import preprocess
from graph_prune.quantize import options as quantize_options
from tests import binaries

_MODEL = os.path.join(binaries.ROOT, "models", "default")
_PB = os.path.join(_MODEL, "fmnist_vgg_bn.pb")
_SM = os.path.join(_MODEL, "fmnist_vgg_bn_savedmodel")
_TYPES = {"bfloat16": tf.bfloat16, "float16": tf.float16}
# Largest relative error of the outputs against the float32 pruned model, per type
# (bfloat16 keeps 8 bits of mantissa, float16 11).
_TOLERANCE = {"bfloat16": 3e-2, "float16": 5e-3}


def _calibration(samples=256):
  return samples_lib.Spec("fashion-mnist:train", samples=samples, holdout=256,
                          preprocess=preprocess.Preprocess(scale=1 / 255))


def _xla_outputs(model, x):
  fn, _ = tf_model.concrete_function(model.graph_def, list(model.inputs), list(model.outputs))
  return [np.asarray(v) for v in tf.function(fn, jit_compile=True)(tf.constant(x))]


class TensorFlowHalfTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.tmp = self.create_tempdir().full_path
    self.x = np.random.default_rng(0).uniform(0, 1, (8, 28, 28, 1)).astype(np.float32)

  @parameterized.parameters("bfloat16", "float16")
  def test_graphdef_weights_and_compute_cast_io_float32(self, scheme):
    float_out = os.path.join(self.tmp, "pruned.pb")
    pipeline.prune(_PB, float_out, pipeline.Options(ratio=0.5))
    out = os.path.join(self.tmp, f"{scheme}.pb")
    doc = pipeline.prune(_PB, out, pipeline.Options(
        ratio=0.5, quantize=quantize_options.Options(scheme), calibration=_calibration()))
    q = doc["quantization"]
    self.assertEqual(q["scheme"], scheme)
    self.assertEqual(q["holdout"]["agreement"], 1.0)
    self.assertLess(q["holdout"]["max_rel_diff"], _TOLERANCE[scheme])
    # Every weight is stored in the low type: the file is about half the float one.
    self.assertBetween(os.path.getsize(out) / os.path.getsize(float_out), 0.45, 0.56)
    low, pruned = tf_model.load(out), tf_model.load(float_out)
    consts = [n for n in low.graph_def.node if n.op == "Const" and
              tf.make_ndarray(n.attr["value"].tensor).ndim >= 2]
    self.assertNotEmpty(consts)
    for n in consts:
      self.assertEqual(n.attr["dtype"].type, _TYPES[scheme].as_datatype_enum, n.name)
    convs = [n for n in low.graph_def.node if n.op == "Conv2D"]
    self.assertTrue(convs and all(n.attr["T"].type == _TYPES[scheme].as_datatype_enum
                                  for n in convs))
    # Same input and output names, float32 at both; XLA computes what the float
    # pruned model computes, to the type's precision.
    self.assertEqual((low.inputs, low.outputs), (pruned.inputs, pruned.outputs))
    got, want = _xla_outputs(low, self.x)[0], _xla_outputs(pruned, self.x)[0]
    self.assertEqual(got.dtype, np.float32)
    self.assertLess(np.max(np.abs(got - want)) / np.max(np.abs(want)), _TOLERANCE[scheme])
    # The project's own runner (evaluate, bench, the measurement) runs it too.
    runner = tf_model.Runner(low)
    np.testing.assert_allclose(runner([self.x])[0], got, rtol=1e-6, atol=1e-6)
    runner.close()

  def test_saved_model_keeps_its_signature(self):
    out = os.path.join(self.tmp, "sm_bf16")
    pipeline.prune(_SM, out, pipeline.Options(
        ratio=0.5, quantize=quantize_options.Options("bfloat16"), calibration=_calibration()))
    original = tf.saved_model.load(_SM).signatures["serving_default"]
    cast = tf.saved_model.load(out).signatures["serving_default"]
    self.assertEqual(cast.structured_input_signature, original.structured_input_signature)
    self.assertEqual({k: (v.dtype, v.shape.as_list()) for k, v in cast.structured_outputs.items()},
                     {k: (v.dtype, v.shape.as_list())
                      for k, v in original.structured_outputs.items()})
    key = next(iter(cast.structured_input_signature[1]))
    y = tf.function(lambda t: cast(**{key: t}), jit_compile=True)(tf.constant(self.x))
    self.assertEqual({v.dtype for v in y.values()}, {tf.float32})

  def test_command_line_prints_the_measurement(self):
    # The summary's quantization line once failed on these schemes (it read codebook keys).
    out = os.path.join(self.tmp, "bf16.pb")
    r = subprocess.run([*binaries.command("prune"), f"--in={_PB}", f"--out={out}", "--ratio=0.5",
                        "--quantize=bfloat16", "--calibration_data=fashion-mnist:train",
                        "--scale=1/255", "--calibration_samples=128",
                        "--calibration_holdout=128"],
                       capture_output=True, text=True, env=binaries.env(), timeout=600,
                       check=False)
    self.assertEqual(r.returncode, 0, r.stderr[-2000:])
    self.assertIn("quantization: bfloat16 weights and compute, for XLA: model ", r.stdout)
    self.assertTrue(os.path.exists(out))

  def test_wrong_outputs_and_schemes_are_refused(self):
    calibration = _calibration(64)
    for out, scheme, message in (
        ("q.pb", "int8", "a GraphDef or SavedModel takes float16 or bfloat16"),
        ("q.pb", "codebook4", "a GraphDef or SavedModel takes float16 or bfloat16"),
        ("q.onnx", "bfloat16", "bfloat16 is for TensorFlow GraphDef and SavedModel")):
      path = os.path.join(self.tmp, out)
      with self.assertRaisesRegex(errors.UsageError, message):
        pipeline.prune(_PB, path, pipeline.Options(
            ratio=0.5, quantize=quantize_options.Options(scheme), calibration=calibration,
            out_format="onnx" if out.endswith(".onnx") else "same"))
      self.assertFalse(os.path.exists(path))


if __name__ == "__main__":
  absltest.main()
