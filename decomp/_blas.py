"""The threads of the BLAS under jaxlib's CPU LAPACK kernels, limited where we call them.

On CPU, XLA lowers `eigh`, `svd`, `cholesky`, ... to jaxlib's LAPACK kernels, which call
the OpenBLAS that scipy ships. A batched call runs one small problem after another (here
64-576 on a side), and OpenBLAS's threading of each costs more than it gains (the README
gives the RSDTR search's time with the default threads and with one, `benchmarks.decomp`).
Environment variables (`OPENBLAS_NUM_THREADS`) act only when the library is loaded, so
the host-driven searches (`decomp.rsdtr`) run under `single_threaded_blas()`, which
limits every loaded BLAS (threadpoolctl) and restores it on exit. The limit is
process-wide while it lasts: BLAS calls of other threads run single-threaded meanwhile.
Jitted functions that users call inside their own programs (the DeepTwist distortion)
cannot be wrapped; for those, set `OPENBLAS_NUM_THREADS=1` on small-CPU machines.
"""

from __future__ import annotations

import contextlib
import functools


@functools.cache
def _controller():
  import scipy.linalg  # noqa: F401  (loads the OpenBLAS that jaxlib's LAPACK kernels call)
  import threadpoolctl

  return threadpoolctl.ThreadpoolController()


@contextlib.contextmanager
def single_threaded_blas():
  """Every loaded BLAS library limited to one thread inside the block, where the default
  backend is the CPU (elsewhere XLA calls no LAPACK and the block runs as it is)."""
  import jax

  if jax.default_backend() != "cpu":
    yield
    return
  with _controller().limit(limits=1, user_api="blas"):
    yield
