"""Reproduces a hang of XLA's CPU runtime (jaxlib 0.10.2), and shows that decomp avoids it.

  PYTHONPATH=. timeout 300 python -m benchmarks.repro_cpu_hang            # ok
  PYTHONPATH=. timeout 300 python -m benchmarks.repro_cpu_hang --batched  # hangs

The whole-ResNet-50 Tucker-2 distortion (53 kernels, one jitted graph, kernels of one shape
vmapped) is run repeatedly. `--batched` swaps decomp's solvers for jax's batched ones
(`jnp.linalg.eigh` on a stack): the program then stops returning, in its first run on a
2-core x86_64 (2026-12-07, 3 of 3 processes). gdb shows the cause: jaxlib's LAPACK kernel
(`lapack_ssyevd_ffi`) runs on an XLA worker thread, splits its batch over the same thread
pool (`jax::ParallelBatchMap`) and waits for the pieces in a `BlockingCounter`; with two
such calls in flight every worker waits and the pieces never run. Not an effect of
OpenBLAS threads, nor of async dispatch.

Without the flag the distortion runs through `decomp` as shipped, whose solvers take one
matrix per LAPACK call where a program is lowered for the CPU
(`decomp._linalg.one_matrix_at_a_time`), so no call re-enters the pool: ok, with no
process-wide setting. `--threads` runs two Python threads, each a jitted stack of `eigh`
through decomp, at the same time. Prints "ok" if it finishes.
"""

import sys
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import shapes
from benchmarks.decomp import _kernels, make_distortion
from decomp import _linalg


def _two_threads():
  """One round: two threads, each running a jitted stack of eigh, at the same time."""
  g = np.random.default_rng(0).standard_normal((36, 128, 600)).astype(np.float32)
  halves = [jnp.asarray(h @ np.swapaxes(h, 1, 2)) for h in (g[:18], g[18:])]
  eigh = jax.jit(lambda x: _linalg.eigh(x)[1])
  pool = ThreadPoolExecutor(2)
  return lambda: list(pool.map(lambda h: jax.block_until_ready(eigh(h)), halves))


def main(runs: int = 100):
  if "--batched" in sys.argv:  # jax's batched solvers, as decomp called them before
    _linalg.eigh = jnp.linalg.eigh
  if "--threads" in sys.argv:
    run = _two_threads()
  else:
    run, _ = make_distortion(_kernels(shapes.resnet50()), "gram", "tucker2")
  for i in range(runs):
    run()
    print(f"run {i + 1}/{runs}", end="\r", flush=True)
  solvers = "batched" if "--batched" in sys.argv else "decomp's"
  print(f"\nok: {runs} runs on {jax.devices()[0]} ({solvers} solvers)")


if __name__ == "__main__":
  main()
