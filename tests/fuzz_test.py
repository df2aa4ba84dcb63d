"""Fuzzing, a CI-size slice (tests/fuzz_models.py): mutated model files are
pruned or refused cleanly, never a traceback, never a file left beside a
refusal, never a changed input. Cases that once failed are named below.
//tests:fuzz_large runs thousands, each in a worker with a timeout."""

import tempfile

from absl.testing import absltest
from absl.testing import parameterized

from tests import fuzz_models

# Each failed before its fix (found by the large run).
_REGRESSIONS = (
    # A swapped input made a computed tensor a Conv's bias: KeyError in the
    # finiteness check, as the rule sliced it without checking it is a constant.
    ("swapped_input_as_bias", '{"mutation": "swap_inputs", "seed": 629145196, '
     '"seed_model": "onnx17"}'),
    # Initializer dims or dtype that do not fit its data: ValueError from numpy.
    ("initializer_dims_lie", '{"mutation": "dims", "seed": 1803631832, "seed_model": "onnx13"}'),
    ("initializer_dtype_lie", '{"mutation": "dtype", "seed": 1974475031, '
     '"seed_model": "onnx21"}'),
    # A TensorFlow Const whose content does not fit its shape: ValueError, and
    # grappler's C++ error log dumping the tensor.
    ("const_shape_lie", '{"mutation": "dims", "seed": 972122757, "seed_model": "pb"}'),
    ("const_bytes_flipped_in_text", '{"mutation": "bitflip", "seed": 309580411, '
     '"seed_model": "pbtxt"}'),
    # A bit flip in a string field: UnicodeDecodeError from onnx.checker.
    ("checker_unicode_error", '{"mutation": "bitflip", "seed": 1591838410, '
     '"seed_model": "onnx13"}'),
)


class FuzzTest(parameterized.TestCase):

  def _check(self, case):
    with tempfile.TemporaryDirectory() as tmp:
      status, detail = fuzz_models.run(case, tmp)
    self.assertNotEqual(status, "failed", f"{fuzz_models.to_json(case)}: {detail}")
    return status

  @parameterized.named_parameters(*_REGRESSIONS)
  def test_regression(self, text):
    self.assertEqual(self._check(fuzz_models.from_json(text)), "refused")

  def test_slice(self):
    statuses = [self._check(case) for case in fuzz_models.cases(2024, 90)]
    self.assertIn("refused", statuses)
    self.assertIn("ok", statuses)


if __name__ == "__main__":
  absltest.main()
