"""XLA CPU settings of decomp: an opt-in for host memory reuse, and FAST_COMPILE.

Importing `decomp` changes no process-wide state: not `os.environ`, not jax's
configuration, not malloc's. Every setting here acts only where jax runs on the CPU.

FAST_COMPILE (below) is a per-program compile option of the RSDTR search, where the
default backend is the CPU and its XLA knows it (probed once).
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import os
import warnings


def _accelerator_jax() -> bool:
  """Whether this jax may start a GPU/TPU backend (a plugin or libtpu is installed and
  `JAX_PLATFORMS` does not restrict it to the CPU). Decided without starting jax."""
  platforms = os.environ.get("JAX_PLATFORMS", "").strip().lower()
  if platforms and all(p.strip() == "cpu" for p in platforms.split(",")):
    return False
  if importlib.metadata.entry_points(group="jax_plugins"):
    return True
  return any(importlib.util.find_spec(m) is not None for m in ("libtpu", "jax_plugins"))


def _backends_started() -> bool:
  """Whether jax has started a backend (after which `XLA_FLAGS` is read no more). Asks
  jax's private `xla_bridge.backends_are_initialized`; where this jax lacks it, False
  (the flag is then set, and takes effect if XLA has indeed not started)."""
  try:
    from jax._src import xla_bridge  # private API: guarded
  except ImportError:
    return False
  return bool(getattr(xla_bridge, "backends_are_initialized", lambda: False)())


# glibc `mallopt` parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_KEEP_FREE = 2**31 - 1  # bytes glibc may keep free at the top of its heap (mallopt's int max)


def reuse_host_memory() -> bool:
  """Opt in: glibc's `malloc` keeps the memory XLA's CPU runtime frees, for this process.

  Why: XLA's CPU client allocates each execution's buffers with `malloc` on its worker
  threads. A training step's temporary buffer is hundreds of MB (591 MB for the CIFAR
  ResNet-32 step at batch 128, seen with `strace`), far above glibc's largest mmap
  threshold (32 MB), so glibc maps it fresh and unmaps it at every step, and the kernel
  faults in and zeroes each of its pages every time. With every thread served from
  glibc's main heap (`M_ARENA_MAX` 1: a worker thread's own arena maps a block that large
  anyway), no block mapped on its own (`M_MMAP_MAX` 0) and up to 2 GiB kept free at the
  top of the heap (`M_TRIM_THRESHOLD`), the next step reuses the freed buffer. Measured on
  120 steps of the Fashion-MNIST ResNet-20 teacher config (batch 128, 2-core AMD EPYC):
  10.8 million page faults and 20.9 s of kernel time without, 0.35 million and 2.6 s
  with. The cost: glibc keeps what it freed, so the peak resident memory is higher (in a
  loop of one 64 MB-output program, 1.2 GB against 0.5 GB). The README's layers section
  gives the speed.

  Process-wide (malloc's settings) and so an explicit opt-in, called first thing in an
  entry point, before jax starts (a thread that has already allocated keeps its arena):
  the `train` CLI, the benchmarks, the test suite. It does nothing where the C library
  is not glibc, where `GLIBC_TUNABLES` already sets malloc tunables (the user's choice),
  where a GPU or TPU jax plugin may start (device memory has its own allocator there), or
  where jax has started (with a warning), unless an earlier call put them in effect. Returns
  whether the settings are in effect."""
  global _REUSING
  import ctypes

  if _REUSING:  # already in effect in this process (a second entry point calling it)
    return True
  if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "") or _accelerator_jax():
    return False
  try:
    libc = ctypes.CDLL(None)
    libc.gnu_get_libc_version  # noqa: B018 (glibc only: musl and macOS lack it)
    mallopt = libc.mallopt
  except (OSError, AttributeError):
    return False
  if _backends_started():
    warnings.warn(
      "reuse_host_memory: jax already started, and its worker threads keep the malloc "
      "arenas they have; call it before any jax computation.",
      RuntimeWarning,
      stacklevel=2,
    )
    return False
  settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _KEEP_FREE))
  _REUSING = all(mallopt(param, value) == 1 for param, value in settings)
  return _REUSING


_REUSING = False  # whether `reuse_host_memory` put its settings in effect in this process


FAST_COMPILE = {"xla_cpu_use_fusion_emitters": False}
"""`jax.jit` compiler options of the RSDTR search's programs: XLA's CPU backend compiles
their fusions with its classic LLVM IR emitters instead of the MLIR fusion emitters.

The search compiles dozens of small programs (one per kernel shape and round, each a few
eigendecompositions around small fusions), and the fusion emitters' compile time
dominates them (the README's decomposition section gives the figures). Set per program,
so the user's own programs are left alone. Used through `search_compiler_options`."""


@functools.cache
def search_compiler_options() -> dict | None:
  """`FAST_COMPILE` where jax's default backend is the CPU and its XLA knows the option;
  else None (XLA's defaults).

  Decided once per process, on first use. The option changes compile time only, never a
  result, so where an XLA lacks it (the GPU machine runs a newer jax than the 0.10.2 this
  project is tested with) the search compiles with XLA's defaults rather than fail: jax
  rejects an unknown option. `tests/test_xla_cpu.py` checks that it is in effect with the
  tested jax.
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
