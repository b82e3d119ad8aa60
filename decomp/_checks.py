"""Argument checks shared by the public wrappers of `decomp`.

Each check raises `ValueError` naming the argument, the value it got and the allowed
range. Checks that need values (NaN/Inf) run only on concrete arrays: under a user's
`jit` or `vmap` the values are tracers and only shapes can be checked.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def as_float_array(
  x, name: str, *, ndim: int | None = None, min_ndim: int = 1, check_values: bool = True
) -> jax.Array:
  """Returns `x` as a floating jax array after checking its rank and (unless the caller
  checks them on the device itself, `check_values=False`) its values."""
  if isinstance(x, jax.core.Tracer):
    arr = x
  else:
    arr = jnp.asarray(x)
  if not jnp.issubdtype(arr.dtype, jnp.floating):
    raise ValueError(f"{name} must be a floating-point array, got dtype {arr.dtype}.")
  if ndim is not None and arr.ndim != ndim:
    raise ValueError(f"{name} must be {ndim}-way, got shape {tuple(arr.shape)} ({arr.ndim}-way).")
  if arr.ndim < min_ndim:
    raise ValueError(f"{name} must have at least {min_ndim} modes, got shape {tuple(arr.shape)}.")
  if 0 in arr.shape:
    raise ValueError(f"{name} must not have an empty mode, got shape {tuple(arr.shape)}.")
  if check_values and is_concrete(arr) and not bool(jnp.all(jnp.isfinite(arr))):
    raise ValueError(f"{name} contains NaN or Inf; decompositions need finite input.")
  return arr


def normalized(
  x: jax.Array, name: str, batch_dims: int = 0, names=None
) -> tuple[jax.Array, jax.Array]:
  """`(x / s, s)` with `s = max|x|` (1 where `x` is zero), per item of the leading
  `batch_dims` axes (`s` has their shape).

  Why: a decomposition squares its input (Gram matrices, norms), so float32 entries above
  ~1e19 overflow and below ~1e-19 underflow, and the factors come out NaN or zero at scales
  where the exact answer is fine. A decomposition of `x / s` scaled back by `s`
  (`decomp.factors.scaled`) is exact at any scale the dtype holds. On concrete input, an
  `x` whose norm would overflow the dtype (`max|x| sqrt(size)` above its largest finite
  value), or whose largest entry is below its smallest normal number (its digits are
  already lost), raises `ValueError` naming `name`, or with one batch axis `names[i]` of the
  item at fault."""
  axes = tuple(range(batch_dims, x.ndim))
  m = jnp.max(jnp.abs(x), axis=axes)
  if is_concrete(x):
    info = jnp.finfo(x.dtype)
    n = math.prod(x.shape[batch_dims:])
    # On the host: XLA's CPU flushes subnormals to zero, which would hide them.
    host = np.max(np.abs(np.asarray(x, np.float64)), axis=axes).reshape(-1)
    if names is not None:  # the first item at fault names itself
      bad = ~np.isfinite(host) | (host * math.sqrt(n) > float(info.max))
      bad |= (host > 0) & (host < float(info.tiny))
      name = names[int(np.argmax(bad))] if bad.any() else name
    if not np.all(np.isfinite(host)):
      raise ValueError(f"{name} contains NaN or Inf; decompositions need finite input.")
    hi = float(host.max())
    pos = host[host > 0]
    lo = float(pos.min()) if pos.size else 0.0
    if hi * math.sqrt(n) > float(info.max):
      raise ValueError(
        f"{name}: its largest entry {hi:.3g} times sqrt(size) {math.sqrt(n):.3g} overflows "
        f"{x.dtype} (largest {float(info.max):.3g}); allowed max|{name}| <= "
        f"{float(info.max) / math.sqrt(n):.3g}. Scale it down, or pass float64."
      )
    if 0 < lo < float(info.tiny):
      raise ValueError(
        f"{name}: its largest entry {lo:.3g} is below the smallest normal {x.dtype} "
        f"({float(info.tiny):.3g}), where its digits are lost; allowed max|{name}| >= "
        f"{float(info.tiny):.3g} (or all zero). Scale it up, or pass float64."
      )
  s = jnp.where(m > 0, m, 1).astype(x.dtype)
  return x / s.reshape(s.shape + (1,) * len(axes)), s


def half_to_float32(x: jax.Array) -> tuple[jax.Array, jnp.dtype]:
  """`(x in float32, x's dtype)` for float16/bfloat16 `x` (LAPACK has no half-precision
  kernels, and their 3-4 digits cannot hold an eigendecomposition); `(x, dtype)` else."""
  if x.dtype in (jnp.float16, jnp.bfloat16):
    return x.astype(jnp.float32), x.dtype
  return x, x.dtype


def cast_floats(tree, dtype):
  """Every floating leaf of `tree` cast to `dtype` (the caller's half precision back)."""
  if dtype not in (jnp.float16, jnp.bfloat16):
    return tree
  return jax.tree.map(
    lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree
  )


def as_kernel(kernel, name: str = "kernel", check_values: bool = True) -> jax.Array:
  """A Flax conv kernel `(d_h, d_w, S, T)`."""
  return as_float_array(kernel, name, ndim=4, check_values=check_values)


def check_rank(rank, name: str, hi: int, lo: int = 1) -> int:
  if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)):
    raise ValueError(f"{name} must be an integer in [{lo}, {hi}], got {rank!r}.")
  if not lo <= rank <= hi:
    raise ValueError(f"{name}={rank} is outside the allowed range [{lo}, {hi}].")
  return int(rank)


def check_eps(eps, name: str = "eps") -> float:
  if isinstance(eps, bool) or not isinstance(eps, (int, float, np.floating)):
    raise ValueError(f"{name} must be a float in (0, 1), got {eps!r}.")
  if not 0.0 < float(eps) < 1.0:
    raise ValueError(f"{name}={eps} is outside the allowed range (0, 1).")
  return float(eps)


def eps_floor(dtype) -> float:
  """The smallest relative error an eps-bounded decomposition delivers in `dtype`: the
  rounding of the products and eigensolvers (float32: 9.6e-7 measured at eps=1e-9), with
  a safety factor. Below it the documented bound `error <= eps` would break silently."""
  return 64 * float(jnp.finfo(dtype).eps)


def check_eps_floor(eps: float, dtype, name: str = "eps") -> float:
  floor = eps_floor(dtype)
  if eps < floor:
    raise ValueError(
      f"{name}={eps} is below what {jnp.dtype(dtype).name} can deliver (floor {floor:.2g}); "
      f"use eps >= {floor:.2g}, or a float64 kernel (jax_enable_x64)."
    )
  return eps


def check_ratio(ratio, name: str = "ratio") -> float:
  if isinstance(ratio, bool) or not isinstance(ratio, (int, float, np.floating)):
    raise ValueError(f"{name} must be a float in (0, 1], got {ratio!r}.")
  if not 0.0 < float(ratio) <= 1.0:
    raise ValueError(f"{name}={ratio} is outside the allowed range (0, 1].")
  return float(ratio)


def check_method(method: str) -> str:
  if method not in ("gram", "svd"):
    raise ValueError(f"method must be 'gram' or 'svd', got {method!r}.")
  return method


def one_of_ranks_eps(ranks, eps, fn: str) -> None:
  if (ranks is None) == (eps is None):
    raise ValueError(f"{fn}: give exactly one of ranks= or eps=, got ranks={ranks!r}, eps={eps!r}.")


def rank_tuple(ranks, n: int, name: str) -> tuple:
  """`ranks` as a tuple of length `n`; an int is repeated."""
  if isinstance(ranks, (int, np.integer)) and not isinstance(ranks, bool):
    return (int(ranks),) * n
  if not isinstance(ranks, Sequence) or len(ranks) != n:
    raise ValueError(f"{name} must be an int or a sequence of {n} ints, got {ranks!r}.")
  return tuple(ranks)


def prod(xs) -> int:
  return int(math.prod(xs))
