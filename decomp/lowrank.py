"""Matrix low-rank decompositions of conv kernels: lowered SVD and tiled SVD (DeepTwist §4)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from decomp import _checks
from decomp._linalg import truncated_svd
from decomp.factors import LowRank, Tiled, scaled


def lowered(kernel: jax.Array) -> jax.Array:
  """The lowered matrix `(T, S * d_h * d_w)` of a kernel `(d_h, d_w, S, T)`, columns `(s, h, w)`."""
  return jnp.transpose(kernel, (3, 2, 0, 1)).reshape(kernel.shape[3], -1)


def unlowered(matrix: jax.Array, kernel_shape) -> jax.Array:
  """Inverse of `lowered`: `(T, S d_h d_w)` back to the kernel `(d_h, d_w, S, T)`."""
  d_h, d_w, s, t = kernel_shape
  return jnp.transpose(matrix.reshape(t, s, d_h, d_w), (2, 3, 1, 0))


@functools.partial(jax.jit, static_argnames=("rank", "method"))
def _lowered_svd(kernel, rank, method):
  d_h, d_w, s, t = kernel.shape
  # The SVD of W^T = kernel.reshape(d_h d_w S, T) is the lowered matrix's, transposed,
  # with its columns permuted; neither changes the singular values or the truncation.
  u, _, rest = truncated_svd(kernel.reshape(d_h * d_w * s, t), rank, method)
  return LowRank(u.reshape(d_h, d_w, s, rank), rest)


def lowered_svd(kernel, rank: int, *, method: str = "gram") -> LowRank:
  """Rank-`r` SVD of the lowered matrix `T x (S d_h d_w)` of a conv kernel.

  As a conv: a `d_h x d_w` conv `S -> r` with `u`, then a 1x1 conv `r -> T` with `v`.

  Args:
    kernel: Flax conv kernel `(d_h, d_w, S, T)`.
    rank: `1 <= r <= min(T, S d_h d_w)`.
    method: `"gram"` or `"svd"`.

  Returns:
    `LowRank(u (d_h, d_w, S, r), v (r, T))`; `u` has orthonormal columns (as a
    `(d_h d_w S, r)` matrix), `v` carries the singular values.
  """
  kernel, dtype = _checks.half_to_float32(_checks.as_kernel(kernel))
  d_h, d_w, s, t = kernel.shape
  rank = _checks.check_rank(rank, "rank", min(t, s * d_h * d_w))
  kernel, s = _checks.normalized(kernel, "kernel")
  f = _lowered_svd(kernel, rank, _checks.check_method(method))
  return _checks.cast_floats(scaled(f, s), dtype)


def _tiles(matrix: jax.Array, grid) -> jax.Array:
  """`(m, n)` -> `(g_r, g_c, m / g_r, n / g_c)`."""
  (m, n), (g_r, g_c) = matrix.shape, grid
  return matrix.reshape(g_r, m // g_r, g_c, n // g_c).transpose(0, 2, 1, 3)


@functools.partial(jax.jit, static_argnames=("grid", "rank", "method"))
def _tiled_svd(matrix, grid, rank, method):
  def one(tile):
    u, _, rest = truncated_svd(tile, rank, method)
    return u, rest

  u, v = jax.vmap(jax.vmap(one))(_tiles(matrix, grid))
  return Tiled(u, v)


def _check_grid(shape, grid) -> tuple:
  if not isinstance(grid, (tuple, list)) or len(grid) != 2:
    raise ValueError(f"grid must be a pair (g_r, g_c), got {grid!r}.")
  for name, g, size in (("grid[0]", grid[0], shape[0]), ("grid[1]", grid[1], shape[1])):
    _checks.check_rank(g, name, size)
    if size % g:
      raise ValueError(
        f"{name}={g} does not divide the matrix dimension {size}; allowed: a divisor of {size}."
      )
  return tuple(int(g) for g in grid)


def tiled_svd(matrix, *, grid, rank: int, method: str = "gram") -> Tiled:
  """Tiled SVD (DeepTwist §4.2): the matrix cut into a `g_r x g_c` grid of equal tiles,
  each truncated to rank `k`.

  Args:
    matrix: `(m, n)`; for a conv kernel, its `lowered` matrix.
    grid: `(g_r, g_c)`, each dividing its dimension.
    rank: per-tile rank `1 <= k <= min(m / g_r, n / g_c)`.
    method: `"gram"` or `"svd"`.

  Returns:
    `Tiled(u (g_r, g_c, m/g_r, k), v (g_r, g_c, k, n/g_c))`.
  """
  matrix = _checks.as_float_array(matrix, "matrix", ndim=2)
  grid = _check_grid(matrix.shape, grid)
  a, b = matrix.shape[0] // grid[0], matrix.shape[1] // grid[1]
  rank = _checks.check_rank(rank, "rank", min(a, b))
  matrix, s = _checks.normalized(matrix, "matrix")
  return scaled(_tiled_svd(matrix, grid, rank, _checks.check_method(method)), s)


def tiled_svd_rank(shape, grid, *, ratio: float) -> int:
  """The largest per-tile rank whose tiled SVD keeps at most `ratio` of the matrix's numbers.

  A rank-`k` tiling of an `(m, n)` matrix stores `k (g_c m + g_r n)` numbers.

  Args:
    shape: `(m, n)`.
    grid: `(g_r, g_c)`, each dividing its dimension.
    ratio: kept fraction of the `m n` numbers, in (0, 1] (compression rate `1 / ratio`).

  Raises:
    ValueError: if even rank 1 stores more than `ratio` of the numbers.
  """
  m, n = shape
  grid = _check_grid(shape, grid)
  ratio = _checks.check_ratio(ratio)
  per_rank = grid[1] * m + grid[0] * n
  k = min(int(ratio * m * n // per_rank), m // grid[0], n // grid[1])
  if k < 1:
    raise ValueError(
      f"ratio={ratio} is below what rank 1 stores on grid {grid} of a {m}x{n} "
      f"matrix ({per_rank / (m * n):.4g}); allowed: ratio >= that."
    )
  return k
