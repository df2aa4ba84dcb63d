"""Quantization after pruning (--quantize): codebook k-means and packing, each
scheme on ONNX models (structure, validity, measured agreement with the float
model), a TensorFlow model exported and quantized, and bad input."""

import dataclasses
import json
import os
import subprocess

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np
import onnx
from onnx import numpy_helper

from graph_prune import errors
from graph_prune import pipeline
from graph_prune.adapters import onnx_model
from graph_prune.calibration import samples as samples_lib
from graph_prune.quantize import codebook
from graph_prune.quantize import options as quantize_options
from tests import binaries
from tests import onnx_net

_PB = os.path.join(binaries.ROOT, "models", "default", "fmnist_vgg_bn.pb")


class CodebookTest(absltest.TestCase):

  def test_few_distinct_values_are_stored_exactly(self):
    w = np.random.default_rng(0).choice([-0.5, 0.0, 0.25, 2.0], size=(6, 5, 3)).astype(np.float32)
    t = codebook.fit(w, 4)
    np.testing.assert_array_equal(t.weight(), w)
    self.assertEqual(len(t.codebook), 4)
    self.assertEqual(codebook.rel_error(w, t), 0.0)

  def test_more_bits_less_error_and_lloyd_beats_its_start(self):
    w = np.random.default_rng(1).standard_normal((64, 32, 3, 3)).astype(np.float32)
    e4, e8 = (codebook.rel_error(w, codebook.fit(w, b)) for b in (4, 8))
    self.assertLess(e8, e4 / 8)
    start = codebook.rel_error(w, codebook.fit(w, 4, iterations=1))
    self.assertLess(e4, 0.8 * start)
    self.assertLess(e4, 0.12)     # Lloyd-Max for a Gaussian at 16 levels: ~0.097

  def test_deterministic(self):
    w = np.random.default_rng(2).standard_normal((300, 7)).astype(np.float32)
    a, b = codebook.fit(w, 4), codebook.fit(w.copy(), 4)
    np.testing.assert_array_equal(a.codebook, b.codebook)
    np.testing.assert_array_equal(a.indices, b.indices)

  def test_pack4_round_trip_odd_length(self):
    idx = np.random.default_rng(3).integers(0, 16, 11).astype(np.uint8)
    packed = codebook.pack4(idx)
    self.assertEqual(packed.shape, (6,))
    np.testing.assert_array_equal(codebook.unpack4(packed, 11), idx)
    self.assertEqual(packed[0], idx[0] | (idx[1] << 4))

  def test_bits_out_of_range(self):
    with self.assertRaises(ValueError):
      codebook.fit(np.ones((4, 4), np.float32) * np.arange(4), 3)


def _rows(seed, n, f):
  """Correlated input rows (what a layer sees: channels that move together)."""
  rng = np.random.default_rng(seed)
  return rng.standard_normal((n, f)) @ rng.standard_normal((f, f)) * 0.3 + rng.standard_normal(f)


class CodebookToOutputsTest(absltest.TestCase):
  """codebook.fit_outputs: the table chosen for the layer's outputs, not its values."""

  def _errors(self, x, w, fit):
    ref = np.linalg.norm(x @ w)
    plain = codebook.fit(w, 4).weight()
    return (np.linalg.norm(x @ (plain - w)) / ref,
            np.linalg.norm(x @ (fit.codebook[fit.assign][0] - w)) / ref)

  def test_output_error_well_below_kmeans_and_reported_right(self):
    x = _rows(0, 3000, 72)
    w = np.random.default_rng(1).standard_normal((72, 16)) * 0.1
    h = (x.T @ x)[np.newaxis]
    fit = codebook.fit_outputs(w[np.newaxis], h, 4)
    plain, fitted = self._errors(x, w, fit)
    self.assertAlmostEqual(fit.error_kmeans, plain, places=6)
    self.assertAlmostEqual(fit.error, fitted, places=6)
    self.assertLess(fitted, 0.8 * plain)
    self.assertLessEqual(len(np.unique(fit.assign)), 16)
    self.assertTrue(np.all(np.diff(fit.codebook) >= 0))

  def test_centroids_are_the_least_squares_ones_for_their_assignments(self):
    x = _rows(2, 2000, 24)
    w = np.random.default_rng(3).standard_normal((1, 24, 6))
    h = (x.T @ x)[np.newaxis]
    fit = codebook.fit_outputs(w, h, 4)

    def err(book):
      d = book[fit.assign] - w
      return float(np.einsum("gfo,gfh,gho->", d, h, d))
    base = err(fit.codebook)
    for k in np.unique(fit.assign):
      for step in (1e-3, -1e-3):
        moved = fit.codebook.copy()
        moved[k] += step
        self.assertGreater(err(moved), base)

  def test_representable_weight_is_kept_exactly(self):
    w = np.random.default_rng(4).choice([-0.3, 0.1, 0.7], size=(2, 10, 5))
    x = _rows(5, 500, 10)
    h = np.stack([x.T @ x] * 2)
    fit = codebook.fit_outputs(w, h, 4)
    np.testing.assert_allclose(fit.codebook[fit.assign], w)
    self.assertEqual(fit.error, 0.0)

  def test_identity_gram_is_plain_kmeans_quality(self):
    # Without correlation the output error is the weight error: no worse than k-means.
    w = np.random.default_rng(6).standard_normal((1, 50, 20))
    fit = codebook.fit_outputs(w, np.eye(50)[np.newaxis], 4)
    self.assertLessEqual(fit.error, fit.error_kmeans + 1e-12)


def _model(seed=0):
  """conv 3->8 -> ReLU -> conv 8->8 -> ReLU -> GAP -> Flatten -> Gemm 8->10 (NCHW 8x8).
  The Gemm's bias is small, so that the class follows the input."""
  net = onnx_net.Net(seed)
  h = net.op("Relu", [net.conv("x", 3, 8)])
  h = net.op("Relu", [net.conv(h, 8, 8)])
  h = net.op("Flatten", [net.op("GlobalAveragePool", [h])])
  out = net.dense(h, (8, 10))
  bias = next(i for i in net.inits if i.name == "gemm1_b")
  bias.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(bias) * 0.01, "gemm1_b"))
  return net.model(out, [10])


def _npz(tmp, n=300, seed=0):
  """Images [n, 8, 8, 3]: the samples reader brings them to the model's NCHW."""
  path = os.path.join(tmp, "calib.npz")
  np.savez(path, x=np.random.default_rng(seed).standard_normal((n, 8, 8, 3)).astype(np.float32))
  return path


class OnnxSchemesTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.tmp = self.create_tempdir().full_path
    self.src = os.path.join(self.tmp, "in.onnx")
    onnx.save(_model(), self.src)
    self.calibration = samples_lib.Spec(_npz(self.tmp), samples=200, holdout=100)

  def _quantize(self, scheme, ratio=0.5, **kw):
    out = os.path.join(self.tmp, f"{scheme}.onnx")
    doc = pipeline.prune(self.src, out, pipeline.Options(
        ratio=ratio, overwrite=True, calibration=self.calibration,
        quantize=quantize_options.Options(scheme, min_agreement=kw.pop("min_agreement", 0.9),
                                          **kw)))
    proto = onnx.load(out)
    onnx.checker.check_model(proto, full_check=True)
    onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
    return out, proto, doc.to_json()["quantization"]

  def _outputs(self, path, x):
    return onnx_model.Runner(onnx_model.load(path))([x])[0]

  def test_int8_is_qdq_and_agrees(self):
    out, proto, q = self._quantize("int8")
    ops = [n.op_type for n in proto.graph.node]
    self.assertGreaterEqual(ops.count("DequantizeLinear"), 3 + 3)   # 3 weights, activations
    int8_weights = [t for t in proto.graph.initializer
                    if t.data_type == onnx.TensorProto.INT8 and len(t.dims) > 1]
    self.assertLen(int8_weights, 3)
    conv_scales = [numpy_helper.to_array(t) for t in proto.graph.initializer
                   if t.name.startswith("conv1_w") and "scale" in t.name]
    self.assertEqual(conv_scales[0].shape, (4,))                   # per channel, pruned to 4
    self.assertEqual((q["linear_layers"], q["linear_layers_float"]), (3, 0))
    self.assertEqual(q["calibration_samples"], 192)                # 3 full batches of 64
    self.assertGreaterEqual(q["holdout"]["agreement"], 0.9)
    self.assertEqual(q["holdout_samples"], 100)
    self.assertLess(q["holdout"]["rel_error"], 0.1)
    # The report's figures are the written model's.
    x = np.load(os.path.join(self.tmp, "calib.npz"))["x"][200:].transpose(0, 3, 1, 2)
    pruned = os.path.join(self.tmp, "float.onnx")
    pipeline.prune(self.src, pruned, pipeline.Options(ratio=0.5, overwrite=True))
    a, b = self._outputs(pruned, x), self._outputs(out, x)
    self.assertAlmostEqual(float(np.mean(a.argmax(1) == b.argmax(1))),
                           q["holdout"]["agreement"], places=6)

  def test_float16_keeps_float32_inputs_and_outputs(self):
    _, proto, q = self._quantize("float16", ratio=0.0)
    types = {t.data_type for t in proto.graph.initializer if t.dims}
    self.assertEqual(types, {onnx.TensorProto.FLOAT16})
    self.assertEqual(proto.graph.input[0].type.tensor_type.elem_type, onnx.TensorProto.FLOAT)
    self.assertEqual(proto.graph.output[0].type.tensor_type.elem_type, onnx.TensorProto.FLOAT)
    self.assertEqual(q["holdout"]["agreement"], 1.0)
    self.assertLess(q["holdout"]["rel_error"], 1e-2)
    weights = sum(len(t.raw_data) for t in proto.graph.initializer if len(t.dims) > 1)
    self.assertEqual(weights, 2 * (8 * 3 * 9 + 8 * 8 * 9 + 8 * 10))

  @parameterized.parameters(4, 8)
  def test_codebook_weights_rebuild_to_the_table(self, bits):
    out, proto, q = self._quantize(f"codebook{bits}", min_agreement=0.0)
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    self.assertNotIn("conv2_w", inits)                        # replaced by its codebook
    gather = next(n for n in proto.graph.node if list(n.output) == ["conv2_w"])
    self.assertEqual(gather.op_type, "Gather")
    prefix = gather.input[0].rsplit("/", 1)[0]
    stored = inits[f"{prefix}/packed" if bits == 4 else f"{prefix}/indices"]
    self.assertEqual(stored.dtype, np.uint8)
    book = inits[gather.input[0]]
    self.assertLessEqual(len(book), 1 << bits)
    # The rebuilt weight, fetched from ONNX Runtime, is the codebook at the indices.
    model = onnx_model.load(out)
    w = onnx_model.Runner(model, extra=["conv2_w"])([np.zeros((1, 3, 8, 8), np.float32)])[1]
    self.assertEqual(w.shape, (4, 4, 3, 3))
    idx = codebook.unpack4(stored, w.size) if bits == 4 else stored.reshape(-1)
    np.testing.assert_array_equal(w.reshape(-1), book[idx])
    self.assertEqual(q["packed"], bits == 4)
    self.assertEqual(q["weights"], 3)
    # The file holds about bits/32 of the weights' float bytes (plus the codebooks).
    self.assertLess(q["weight_bytes_stored"],
                    q["weight_bytes_float"] * bits / 32 + 3 * (4 << bits) + 3)

  def test_codebook_fitted_to_outputs_beats_kmeans_on_held_out_samples(self):
    _, _, fitted = self._quantize("codebook4", min_agreement=0.0)
    _, _, plain = self._quantize("codebook4", min_agreement=0.0, codebook_fit="kmeans")
    self.assertEqual((fitted["codebook_fit"], plain["codebook_fit"]), ("outputs", "kmeans"))
    self.assertEqual(fitted["layers_fitted"], 3)
    for layer in fitted["layers"]:
      self.assertLess(layer["output_rel_error"], layer["output_rel_error_kmeans"])
    # Held out: samples the fit never saw.
    self.assertLess(fitted["holdout"]["rel_error"], 0.7 * plain["holdout"]["rel_error"])
    self.assertEqual(fitted["weight_bytes_stored"], plain["weight_bytes_stored"])

  def test_ratio_zero_quantizes_alone(self):
    _, proto, q = self._quantize("int8", ratio=0.0)
    w = [t for t in proto.graph.initializer
         if t.data_type == onnx.TensorProto.INT8 and len(t.dims) > 1]
    self.assertEqual(sorted(tuple(t.dims) for t in w),
                     [(8, 3, 3, 3), (8, 8, 3, 3), (8, 10)])
    self.assertGreaterEqual(q["holdout"]["agreement"], 0.9)

  def test_below_min_agreement_writes_nothing(self):
    # Ranges calibrated on samples a thousand times smaller than the held-out ones:
    # every activation of the held-out samples saturates.
    x = np.random.default_rng(0).standard_normal((300, 8, 8, 3)).astype(np.float32)
    x[:200] *= 1e-3
    path = os.path.join(self.tmp, "skewed.npz")
    np.savez(path, x=x)
    out = os.path.join(self.tmp, "low.onnx")
    with self.assertRaisesRegex(errors.QuantizationError,
                                r"agrees with the float model on .*% of 100 held-out samples, "
                                r"below --min_agreement 99\.00%.*nothing written"):
      pipeline.prune(self.src, out, pipeline.Options(
          ratio=0.5, calibration=samples_lib.Spec(path, samples=200, holdout=100),
          quantize=quantize_options.Options("int8")))
    self.assertFalse(os.path.exists(out))


class SweepTest(absltest.TestCase):

  def test_quantize_is_a_sweep_dimension(self):
    from graph_prune.bench import timing  # pylint: disable=g-import-not-at-top
    from graph_prune.sweep import config  # pylint: disable=g-import-not-at-top
    from graph_prune.sweep import sweep  # pylint: disable=g-import-not-at-top
    tmp = self.create_tempdir().full_path
    src = os.path.join(tmp, "in.onnx")
    onnx.save(_model(), src)
    settings = config.Config(
        model=src, out_dir=os.path.join(tmp, "sweep"), ratios=(0.5,), criteria=("l1",),
        batch_sizes=(1,), device="cpu", timing=timing.Settings(warmup=1, min_runs=3,
                                                                max_seconds=0.3),
        memory=False, calibration=samples_lib.Spec(_npz(tmp), samples=200, holdout=100),
        quantize=("none", "int8"), min_agreement=0.9)
    summary = sweep.run(settings, notify=lambda line: None)
    self.assertEqual(summary.failed, 0)
    with open(os.path.join(settings.out_dir, "rows.jsonl"), encoding="utf-8") as f:
      rows = [json.loads(line) for line in f]
    self.assertEqual([r["key"] for r in rows], ["r0.5_l1_rt1", "r0.5_l1_rt1_qint8"])
    plain, q = rows
    self.assertEqual((plain["quantize"], q["quantize"]), ("none", "int8"))
    self.assertIsNone(plain["quantize_bytes"])
    self.assertGreaterEqual(q["quantize_agreement"], 0.9)
    self.assertGreater(q["b1_speedup_median"], 0)
    path = os.path.join(settings.out_dir, "models", "r0.5_l1_rt1_qint8.onnx")
    self.assertEqual(q["quantize_bytes"], os.path.getsize(path))   # QDQ: bigger, this tiny
    written = onnx.load(path)
    self.assertIn("DequantizeLinear", {n.op_type for n in written.graph.node})
    with self.assertRaisesRegex(errors.UsageError, "quantizes ONNX models"):
      config.check(dataclasses.replace(settings, model=_PB))
    with self.assertRaisesRegex(errors.UsageError, "unknown --quantize scheme 'int3'"):
      config.parse_quantize(["none", "int3"])


def _cli(*args):
  return subprocess.run([*binaries.command("prune"), *args], capture_output=True, text=True,
                        env=binaries.env(), timeout=600, check=False)


class CommandTest(absltest.TestCase):

  def test_tensorflow_exported_and_int8(self):
    tmp = self.create_tempdir().full_path
    out, report = os.path.join(tmp, "q.onnx"), os.path.join(tmp, "q.json")
    # Unpruned: the pruned model without recovery sits near its decision boundaries,
    # and int8 flips more than 1% of them (the check refuses it).
    r = _cli(f"--in={_PB}", f"--out={out}", "--out_format=onnx", "--ratio=0",
             "--quantize=int8", "--calibration_data=fashion-mnist:train", "--scale=1/255",
             "--calibration_samples=512", "--calibration_holdout=256", f"--report={report}")
    self.assertEqual(r.returncode, 0, r.stderr[-2000:])
    self.assertIn("quantization: int8 (minmax, 512 calibration samples, 7/7 linear layers int8)",
                  r.stdout)
    q = json.load(open(report))["quantization"]
    self.assertGreaterEqual(q["holdout"]["agreement"], 0.99)
    self.assertGreater(q["size_ratio"], 3.0)
    self.assertEqual(os.path.getsize(out), q["model_bytes_after"])

  def test_litert_float32_and_int8_run_in_bench_and_evaluate(self):
    tmp = self.create_tempdir().full_path
    f32, i8 = os.path.join(tmp, "pruned.tflite"), os.path.join(tmp, "int8.tflite")
    r = _cli(f"--in={_PB}", f"--out={f32}", "--out_format=tflite", "--ratio=0.5",
             f"--report={tmp}/f32.json")
    self.assertEqual(r.returncode, 0, r.stderr[-2000:])
    export = json.load(open(f"{tmp}/f32.json"))["export"]
    self.assertEqual(export["format"], "tflite")
    self.assertLessEqual(export["max_rel_diff"], 1e-4)     # checked like the ONNX export
    r = _cli(f"--in={_PB}", f"--out={i8}", "--out_format=tflite", "--ratio=0", "--quantize=int8",
             "--calibration_data=fashion-mnist:train", "--scale=1/255",
             "--calibration_samples=256", "--calibration_holdout=256", f"--report={tmp}/i8.json")
    self.assertEqual(r.returncode, 0, r.stderr[-2000:])
    q = json.load(open(f"{tmp}/i8.json"))["quantization"]
    self.assertEqual((q["format"], q["scheme"]), ("tflite", "int8"))
    self.assertGreaterEqual(q["holdout"]["agreement"], 0.98)
    self.assertGreater(q["size_ratio"], 3.0)
    from ai_edge_litert import interpreter  # pylint: disable=g-import-not-at-top
    it = interpreter.Interpreter(model_path=i8)
    kinds = {np.dtype(d["dtype"]).name for d in it.get_tensor_details()}
    self.assertIn("int8", kinds)
    self.assertEqual(np.dtype(it.get_input_details()[0]["dtype"]).name, "float32")
    # //tools:evaluate and //tools:bench run .tflite files.
    r = subprocess.run([*binaries.command("evaluate"), f"--model={i8}",
                        "--data=fashion-mnist:test", "--scale=1/255", "--max_samples=1000",
                        f"--report={tmp}/eval.json"], capture_output=True, text=True,
                       env=binaries.env(), timeout=600, check=False)
    self.assertEqual(r.returncode, 0, r.stderr[-2000:])
    self.assertGreater(json.load(open(f"{tmp}/eval.json"))["top1"], 0.85)
    r = subprocess.run([*binaries.command("bench"), f"--model={i8}", f"--baseline={f32}",
                        "--batch_sizes=1,4", "--max_seconds=2", "--nomemory",
                        f"--report={tmp}/bench.json"], capture_output=True, text=True,
                       env=binaries.env(), timeout=600, check=False)
    self.assertEqual(r.returncode, 0, r.stderr[-2000:])
    bench = json.load(open(f"{tmp}/bench.json"))
    self.assertEqual(bench["models"]["candidate"]["runtime"], "litert")
    self.assertGreater(bench["pairs"]["4"]["speedup"]["median"], 0)

  def test_bad_input_one_line_exit_2_nothing_written(self):
    tmp = self.create_tempdir().full_path
    src = os.path.join(tmp, "in.onnx")
    onnx.save(_model(), src)
    calib = f"--calibration_data={_npz(tmp, 50)}"
    cases = [
        (["--quantize=int8"], "needs calibration samples"),
        (["--quantize=int4", calib], "unknown --quantize scheme 'int4'"),
        (["--quantize=codebook3", calib], "codebook weights take 4 or 8 bits"),
        (["--quantize=int8", "--quantize_calibration=mse", calib],
         "unknown --quantize_calibration 'mse'"),
        (["--quantize=int8", "--min_agreement=1.5", calib], "--min_agreement is 1.5"),
        (["--quantize=codebook4", "--codebook_fit=gptq", calib],
         "unknown --codebook_fit 'gptq'; choose outputs or kmeans"),
    ]
    for extra, message in cases:
      out = os.path.join(tmp, "out.onnx")
      r = _cli(f"--in={src}", f"--out={out}", *extra)
      self.assertEqual(r.returncode, 2, (extra, r.stderr[-1000:]))
      lines = [l for l in r.stderr.splitlines() if l.startswith("prune: ")]
      self.assertLen(lines, 1, r.stderr)
      self.assertIn(message, lines[0])
      self.assertFalse(os.path.exists(out))
    tf_cases = [
        ([f"--out={tmp}/out.pb", "--quantize=int8", calib], "give --out_format=onnx"),
        ([f"--out={tmp}/out.tflite", "--out_format=tflite", "--quantize=codebook4", calib],
         "--out_format=tflite takes --quantize=int8 or float16"),
        ([f"--out={tmp}/out.tflite"], "give --out_format=tflite"),
    ]
    for extra, message in tf_cases:
      r = _cli(f"--in={_PB}", *extra)
      self.assertEqual(r.returncode, 2, (extra, r.stderr[-1000:]))
      self.assertIn(message, r.stderr)
      self.assertFalse(os.path.exists(extra[0].split("=", 1)[1]))
    for extra, message in (
        ([f"--in={src}", f"--out={tmp}/o.tflite", "--out_format=tflite"],
         "--out_format=tflite converts TensorFlow models"),
        ([f"--in={tmp}/m.tflite", f"--out={tmp}/o.onnx"], "is a LiteRT model")):
      r = _cli(*extra)
      self.assertEqual(r.returncode, 2, (extra, r.stderr[-1000:]))
      self.assertIn(message, r.stderr)


if __name__ == "__main__":
  absltest.main()
