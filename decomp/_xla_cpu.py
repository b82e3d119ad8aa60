"""XLA CPU settings of decomp: a workaround for a runtime hang, and the search's compile options.

The hang (jaxlib 0.10.2): a jitted graph with several independent LAPACK calls (batched
`eigh`, `qr`), such as one Tucker-2 distortion of a whole ResNet-50 or one round of the
RSDTR search, sometimes never returns on CPU: every XLA worker thread idles while the
caller waits (`python -m benchmarks.repro_cpu_hang` shows it). It does not happen with XLA's
concurrency-optimized scheduler off, so importing `decomp` turns it off through
`XLA_FLAGS` unless the user set that flag, or the backends already exist (then it is
too late, and a `RuntimeWarning` says how to set it). The flag is read by XLA's CPU
compiler only; other backends ignore it. The compile options: `FAST_COMPILE` below.
"""

from __future__ import annotations

import functools
import os
import warnings

NAME = "xla_cpu_enable_concurrency_optimized_scheduler"
FLAG = f"--{NAME}=false"


def avoid_cpu_runtime_hang() -> bool:
  """Adds `FLAG` to `XLA_FLAGS` if it is not there and XLA has not started; returns
  whether the flag is in effect."""
  flags = os.environ.get("XLA_FLAGS", "")
  if NAME in flags:
    return FLAG in flags.split()
  from jax._src import xla_bridge

  if xla_bridge.backends_are_initialized():
    warnings.warn(
      f"jax started before decomp was imported, so decomp could not set XLA_FLAGS={FLAG}; "
      "on CPU, large decompositions may hang (jaxlib 0.10.2). Import decomp first or set "
      "the flag in the environment.",
      RuntimeWarning,
      stacklevel=3,
    )
    return False
  os.environ["XLA_FLAGS"] = f"{flags} {FLAG}".strip()
  return True


IN_EFFECT = avoid_cpu_runtime_hang()

FAST_COMPILE = {"xla_cpu_use_fusion_emitters": False}
"""`jax.jit` compiler options of the RSDTR search's programs: XLA's CPU backend compiles
their fusions with its classic LLVM IR emitters instead of the MLIR fusion emitters.

The search compiles dozens of small programs (one per kernel shape and round, each a few
eigendecompositions around small fusions), and the fusion emitters' compile time
dominates them: the first whole-ResNet-32 search at eps 0.3 spent 12.8-15.7 s in XLA's
backend compiler (8 runs) instead of 23.2-25.7 s (3 runs) on a 2-core CPU (jax 0.10.2), at
the same run time (`benchmarks.decomp`: 98.9 ms against 92.2 ms, both noisy). Set per
program, so the user's own programs are left alone (the demo's training took as long
with it set globally: 323 and 324 s). Used through `search_compiler_options`."""


@functools.cache
def search_compiler_options() -> dict | None:
  """`FAST_COMPILE` where jax's default backend is the CPU and its XLA knows the option;
  else None (XLA's defaults).

  Decided once per process, on first use. The option changes compile time only, never a
  result, so where an XLA lacks it (it may be retired; the GPU machine runs a newer jax
  than the 0.10.2 this project is tested with) the search compiles with XLA's defaults
  rather than fail: jax rejects an unknown option. `tests/test_xla_cpu.py` checks that it is
  in effect with the tested jax.
  """
  import jax

  if jax.default_backend() != "cpu":
    return None
  probe = jax.jit(lambda x: x + 1, compiler_options=FAST_COMPILE)
  try:
    probe.lower(0.0).compile()
  except jax.errors.JaxRuntimeError:
    return None
  return FAST_COMPILE
