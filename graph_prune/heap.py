"""Giving freed memory back to the operating system between the pipeline's stages.

glibc keeps freed blocks of up to 32 MB in the process's heap for reuse, so a stage's
temporary copies (a weight's bytes decoded from a protobuf, a model as read before
normalisation) stay resident after they are freed and add up to the next stage's
peak: VGG16's whole command peaked at 3.7x its weights where the live data were 2.8x.
malloc_trim returns them (elsewhere than glibc only the collection below is done).
"""

import ctypes
import ctypes.util
import functools
import gc


@functools.lru_cache(maxsize=None)
def _trim():
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    return libc.malloc_trim
  except (OSError, AttributeError):
    return None


# Below this many bytes of weights a model's freed copies are small, and a full
# collection (about 0.15 s with TensorFlow loaded) is not worth it.
WORTH_BYTES = 64 << 20


def give_back(weight_bytes: int) -> None:
  """For a model of `weight_bytes` of weights (WORTH_BYTES or more): collects garbage
  in reference cycles (a model as read was held by one until the collector ran), then
  returns the heap's free memory to the operating system."""
  if weight_bytes < WORTH_BYTES:
    return
  gc.collect()
  trim = _trim()
  if trim is not None:
    trim(0)
