"""What --quantize asks for, checked before any work."""

from __future__ import annotations

import dataclasses
import math

from graph_prune import errors

SCHEMES = ("int8", "float16", "bfloat16", "codebook8", "codebook4")
# Schemes for a TensorFlow GraphDef or SavedModel output (kept for XLA).
TF_SCHEMES = ("float16", "bfloat16")
CALIBRATION_METHODS = ("minmax", "percentile", "entropy")
CODEBOOK_BITS = {"codebook8": 8, "codebook4": 4}
# codebook: fitted to the layers' outputs on the calibration samples, or k-means
# of the weight values alone.
CODEBOOK_FITS = ("outputs", "kmeans")


@dataclasses.dataclass(frozen=True)
class Options:
  scheme: str
  # int8: how activation ranges are chosen from the calibration samples.
  method: str = "minmax"
  per_channel: bool = True        # int8 weights: one scale per output channel
  # The quantized model must agree with the float one on this share of held-out
  # samples (top-1 of the first output); below it nothing is written.
  min_agreement: float = 0.99
  kmeans_iterations: int = 50     # codebook: Lloyd iterations at most
  codebook_fit: str = "outputs"   # codebook: CODEBOOK_FITS
  batch_size: int = 64            # calibration and measurement batches

  @property
  def bits(self) -> int:
    return CODEBOOK_BITS.get(self.scheme, 8 if self.scheme == "int8" else 16)


def check(options: Options) -> None:
  """UsageError for an unknown scheme or method or a threshold out of range."""
  if options.scheme.startswith("codebook") and options.scheme not in SCHEMES:
    raise errors.UsageError(f"--quantize={options.scheme}: codebook weights take 4 or 8 bits "
                            "(codebook4, codebook8)")
  if options.scheme not in SCHEMES:
    raise errors.UsageError(f"unknown --quantize scheme '{options.scheme}'; choose one of "
                            f"{', '.join(SCHEMES)}")
  if options.method not in CALIBRATION_METHODS:
    raise errors.UsageError(f"unknown --quantize_calibration '{options.method}'; choose one "
                            f"of {', '.join(CALIBRATION_METHODS)}")
  if options.codebook_fit not in CODEBOOK_FITS:
    raise errors.UsageError(f"unknown --codebook_fit '{options.codebook_fit}'; choose "
                            f"{' or '.join(CODEBOOK_FITS)}")
  if not (math.isfinite(options.min_agreement) and 0 <= options.min_agreement <= 1):
    raise errors.UsageError(f"--min_agreement is {options.min_agreement}; give a share "
                            "between 0 and 1, e.g. 0.99")
  if options.kmeans_iterations < 1 or options.batch_size < 1:
    raise errors.UsageError("k-means iterations and the batch size must be at least 1")
