"""Reproduces a hang of XLA's CPU runtime (jaxlib 0.10.2, 2-core x86_64, 2026-11-22).

  PYTHONPATH=. timeout 300 python -m benchmarks.repro_cpu_hang               # hangs
  PYTHONPATH=. timeout 300 python -m benchmarks.repro_cpu_hang --workaround  # ok
  PYTHONPATH=. timeout 300 python -m benchmarks.repro_cpu_hang --per-program # hangs

The whole-ResNet-50 Tucker-2 distortion (53 kernels, one jitted graph, kernels of one
shape vmapped: many independent eigh custom calls) is run repeatedly. With XLA's
concurrency-optimized scheduler on (XLA's default) it stops returning within 60 runs on
the machine above: every XLA worker thread idles in `Eigen::ThreadPoolTempl::WaitForWork`
while the caller waits in `block_until_ready` (gdb). Not an effect of OpenBLAS threads
(OPENBLAS_NUM_THREADS=1 hangs too), nor of async dispatch (JAX_CPU_ENABLE_ASYNC_DISPATCH=
false hangs too).

`--workaround` is decomp's opt-in, `decomp.avoid_cpu_runtime_hang()` before jax starts:
XLA's concurrency-optimized scheduler off for the whole process through `XLA_FLAGS`
(`decomp/_xla_cpu.py`). `--per-program` passes the same option as a compile option of
this one program instead, which does NOT avoid the hang: it hung in the first run, 2 of
2 processes (2026-12-02), where `--workaround` ran 72 runs in 300 s on a loaded machine.
Without either, the program compiles with the scheduler explicitly on.
Prints "ok" if it finishes.

  PYTHONPATH=. timeout 300 python -m benchmarks.repro_cpu_hang --workaround --threads

The workaround does not cover programs run from two Python threads at once: two threads,
each running a jitted batched `eigh` (18 matrices of 128) at the same time, stop returning
with the workaround on (2026-11-23, through the environment flag: 8 of 8 processes, after
0-58 rounds, killed at 90-120 s; of 3 earlier processes of 21 rounds one finished, its two
threads 1.4x slower than one thread running both halves). So a program with LAPACK calls
is run from one thread at a time (`decomp.rsdtr` compiles on a pool but runs on the
caller's thread).
"""

import os
import sys

_WORKAROUND = "--workaround" in sys.argv
_PER_PROGRAM = "--per-program" in sys.argv
if _WORKAROUND:
  import decomp

  assert decomp.avoid_cpu_runtime_hang(), os.environ.get("XLA_FLAGS")

from concurrent.futures import ThreadPoolExecutor  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import shapes  # noqa: E402
from benchmarks.decomp import _kernels, make_distortion  # noqa: E402
from decomp import _xla_cpu  # noqa: E402


def _options():
  if _WORKAROUND:
    return None
  return {_xla_cpu.NAME: not _PER_PROGRAM}


def _two_threads():
  """One round: two threads, each running a jitted batched eigh, at the same time."""
  g = np.random.default_rng(0).standard_normal((36, 128, 600)).astype(np.float32)
  halves = [jnp.asarray(h @ np.swapaxes(h, 1, 2)) for h in (g[:18], g[18:])]
  eigh = jax.jit(lambda x: jnp.linalg.eigh(x)[1], compiler_options=_options())
  pool = ThreadPoolExecutor(2)
  return lambda: list(pool.map(lambda h: jax.block_until_ready(eigh(h)), halves))


def main(runs: int = 100):
  if "--threads" in sys.argv:
    run = _two_threads()
  else:
    run, _ = make_distortion(
      _kernels(shapes.resnet50()), "gram", "tucker2", compiler_options=_options()
    )
  for i in range(runs):
    run()
    print(f"run {i + 1}/{runs}", end="\r", flush=True)
  on = "process-wide" if _WORKAROUND else "per program" if _PER_PROGRAM else "off"
  print(f"\nok: {runs} runs on {jax.devices()[0]} (workaround {on})")


if __name__ == "__main__":
  main()
