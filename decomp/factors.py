"""Factor pytrees and the functions every factor type shares.

All factor types are immutable pytrees (NamedTuples of arrays, `None` where a mode is
not factored), so they pass through `jit`, `vmap` and `tree_map`. Shapes below are
for one unbatched factorization; under `vmap` every leaf gains the batch axis.

| type | leaves | represents |
|---|---|---|
| `Tucker(core, factors)` | core `(r_1..r_N)`, factor `(I_k, r_k)`/None | `core x_k U_k` |
| `CP(weights, factors)` | weights `(R,)`, factor k `(I_k, R)` | `sum_r w_r a_r^(1) o ...` |
| `TT(cores)` | core k `(R_{k-1}, I_k, R_k)`, `R_0 = R_N = 1` | tensor train |
| `TR(cores)` | core k `(R_{k-1}, I_k, R_k)`, `R_0 = R_N` | tensor ring (trace closes it) |
| `LowRank(u, v)` | `u (..., r)`, `v (r, ...)` | `tensordot(u, v, 1)` |
| `Tiled(u, v)` | `u (g_r, g_c, m/g_r, k)`, `v (g_r, g_c, k, n/g_c)` | rank-k tiles |
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from decomp._linalg import HIGHEST


class Tucker(NamedTuple):
  core: jax.Array
  factors: tuple  # one (I_k, r_k) array per mode, or None where the mode is not factored


class CP(NamedTuple):
  weights: jax.Array
  factors: tuple


class TT(NamedTuple):
  cores: tuple


class TR(NamedTuple):
  cores: tuple


class LowRank(NamedTuple):
  u: jax.Array
  v: jax.Array


class Tiled(NamedTuple):
  u: jax.Array
  v: jax.Array


@functools.singledispatch
def reconstruct(f) -> jax.Array:
  """The full tensor a factorization represents (works under `jit` and `vmap`)."""
  raise TypeError(f"reconstruct: not a decomp factor type: {type(f).__name__}")


def mode_product(x: jax.Array, u: jax.Array, mode: int) -> jax.Array:
  """`x x_mode u`: contracts mode `mode` of `x` with the second axis of `u` `(J, I_mode)`."""
  return jnp.moveaxis(jnp.tensordot(x, u, axes=((mode,), (1,)), precision=HIGHEST), -1, mode)


@reconstruct.register
def _(f: Tucker) -> jax.Array:
  x = f.core
  for k, u in enumerate(f.factors):
    if u is not None:
      x = mode_product(x, u, k)
  return x


@reconstruct.register
def _(f: CP) -> jax.Array:
  n = len(f.factors)
  letters = "abcdefghijklmnopq"[:n]
  spec = "z," + ",".join(f"{c}z" for c in letters) + "->" + letters
  return jnp.einsum(spec, f.weights, *f.factors, precision=HIGHEST)


def _chain(cores) -> jax.Array:
  """Contracts cores `(R_{k-1}, I_k, R_k)` into `(R_0, I_1, ..., I_N, R_N)`."""
  x = cores[0]
  for g in cores[1:]:
    x = jnp.tensordot(x, g, axes=((-1,), (0,)), precision=HIGHEST)
  return x


@reconstruct.register
def _(f: TT) -> jax.Array:
  x = _chain(f.cores)
  return x.reshape(x.shape[1:-1])


@reconstruct.register
def _(f: TR) -> jax.Array:
  """The ring closed by the last contraction: `_chain` of all cores but the last, then one
  contraction over both ring indices with the last core. (The trace of the full chain,
  `jnp.trace`, materialized an `R_0 x ... x R_0` array and, differentiated, a masked copy
  of it: 9 MB a 64-channel 3x3 kernel at R_0 = 8.)"""
  *head, last = f.cores
  if not head:
    return jnp.trace(last, axis1=0, axis2=-1)
  x = _chain(head)  # (R_0, I_1, ..., I_{N-1}, R_{N-1}); last: (R_{N-1}, I_N, R_0)
  return jnp.tensordot(x, last, axes=((x.ndim - 1, 0), (0, 2)), precision=HIGHEST)


@reconstruct.register
def _(f: LowRank) -> jax.Array:
  return jnp.tensordot(f.u, f.v, axes=1, precision=HIGHEST)


@reconstruct.register
def _(f: Tiled) -> jax.Array:
  g_r, g_c, a, _ = f.u.shape
  b = f.v.shape[-1]
  x = jnp.einsum("ijak,ijkb->iajb", f.u, f.v, precision=HIGHEST)
  return x.reshape(g_r * a, g_c * b)


@functools.singledispatch
def scaled(f, s):
  """The factorization of `s x` from that of `x` (`s` a scalar): the one factor that
  carries the scale (Tucker's core, CP's weights, the last TT/TR core, the right factor of
  LowRank and Tiled) times `s`."""
  raise TypeError(f"scaled: not a decomp factor type: {type(f).__name__}")


@scaled.register
def _(f: Tucker, s):
  return f._replace(core=f.core * s)


@scaled.register
def _(f: CP, s):
  return f._replace(weights=f.weights * s)


@scaled.register(TT)
@scaled.register(TR)
def _(f, s):
  return f._replace(cores=(*f.cores[:-1], f.cores[-1] * s))


@scaled.register(LowRank)
@scaled.register(Tiled)
def _(f, s):
  return f._replace(v=f.v * s)


def num_params(f) -> int:
  """The count of numbers a factorization stores (its leaves' sizes; None stores nothing)."""
  if hasattr(f, "num_params"):
    return f.num_params()
  return int(sum(leaf.size for leaf in jax.tree_util.tree_leaves(f)))


def rel_error(x: jax.Array, f) -> jax.Array:
  """`||x - reconstruct(f)||_F / ||x||_F` (a traced scalar; works under `jit`)."""
  y = reconstruct(f)
  if y.shape != x.shape:
    raise ValueError(
      f"rel_error: x has shape {tuple(x.shape)} but the factorization "
      f"reconstructs shape {tuple(y.shape)}."
    )
  # Both divided by max|x| first: squares of |x| > ~1e19 overflow float32 (and of
  # |x| < ~1e-19 underflow), which made the ratio NaN at scales where the result is fine.
  scale = jnp.max(jnp.abs(x))
  scale = jnp.where(scale > 0, scale, 1).astype(x.dtype)
  xs, ys = (x / scale).ravel(), (y.astype(x.dtype) / scale).ravel()
  return jnp.linalg.norm(xs - ys) / jnp.linalg.norm(xs)
