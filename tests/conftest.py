"""Test configuration: strict numerics, two fake CPU devices, float64 references.

Set before jax is imported anywhere: two host devices so that sharded code paths
run in CI, and x64 so that references can be float64. Inside jax: implicit dtype
promotion and implicit rank promotion are errors, so a silent upcast or a
broadcasting bug in library code fails the suite instead of passing quietly.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
).strip()

import decomp  # noqa: E402

decomp.reuse_host_memory()  # and keeps freed host memory (faster steps; see decomp)

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")
