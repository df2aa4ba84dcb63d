"""The package's error types: one base class, a few specific ones.

Every message is one line that names the problem and says what to do; the CLI
prints it and exits with code 2.
"""


def first_line(e: BaseException) -> str:
  """The first non-blank line of an exception's text (its type when it has none),
  at most 300 characters: what a one-line error message quotes of a library's."""
  lines = [line for line in str(e).splitlines() if line.strip()]
  return (lines[0] if lines else type(e).__name__)[:300]


class GraphPruneError(Exception):
  """Base class of every error graph_prune raises on purpose."""


class InputError(GraphPruneError):
  """The input path or file is missing, unreadable or not a model."""


class UsageError(GraphPruneError):
  """A flag or argument asks for something impossible."""


class NothingToPruneError(GraphPruneError):
  """The model has no channel group that may be pruned."""


class VerificationError(GraphPruneError):
  """The pruned model does not match the masked original."""


class RunError(GraphPruneError):
  """The runtime (TensorFlow, ONNX Runtime) failed to run a model."""


class ReconstructionError(GraphPruneError):
  """Reconstruction made the pruned model agree less with the original."""


class QuantizationError(GraphPruneError):
  """The quantized model agrees with the float model less than asked."""
