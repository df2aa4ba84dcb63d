"""Weight arrays that runtimes can read in place.

TensorFlow feeds a NumPy array to a session without copying it only when its data
starts on a 64-byte boundary (Eigen's alignment for AVX-512; 32 is enough for AVX);
NumPy's own allocations start 16 bytes past one. A VGG16 fed from ordinary arrays
got a second copy of every weight per run, kept afterwards by TensorFlow's CPU
allocator. Arrays made here start on such a boundary.
"""

import numpy as np

ALIGN = 64


def is_aligned(a: np.ndarray) -> bool:
  return a.flags.c_contiguous and a.ctypes.data % ALIGN == 0


def aligned(a) -> np.ndarray:
  """`a` itself where it is C-contiguous, aligned and writeable already, else an
  aligned copy (a read-only view of someone's bytes is copied)."""
  a = np.asarray(a)
  if a.nbytes == 0 or (is_aligned(a) and a.flags.writeable):
    return a
  buf = np.empty(a.nbytes + ALIGN, np.uint8)
  start = (-buf.ctypes.data) % ALIGN
  out = buf[start:start + a.nbytes].view(a.dtype).reshape(a.shape)
  out[...] = a
  return out
