"""CP decomposition by alternating least squares."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from decomp import _checks
from decomp._linalg import HIGHEST, pinv_hermitian, truncated_svd
from decomp.factors import CP, scaled

_LETTERS = "abcdefghijklmnop"


def _mttkrp(x: jax.Array, factors, k: int) -> jax.Array:
  """`X_(k) (A_N kr ... kr A_1)` without forming the Khatri-Rao product: `(I_k, R)`."""
  n = x.ndim
  spec = _LETTERS[:n] + "," + ",".join(f"{_LETTERS[j]}z" for j in range(n) if j != k)
  others = [f for j, f in enumerate(factors) if j != k]
  return jnp.einsum(f"{spec}->{_LETTERS[k]}z", x, *others, precision=HIGHEST)


def _gram_hadamard(factors, k: int) -> jax.Array:
  v = None
  for j, f in enumerate(factors):
    if j != k:
      g = jnp.matmul(f.T, f, precision=HIGHEST)
      v = g if v is None else v * g
  return v


def _normalize(a: jax.Array):
  """Unit columns and their norms; a zero column stays zero with weight 0 (no 0/0)."""
  norms = jnp.linalg.norm(a, axis=0)
  safe = jnp.where(norms > 0, norms, 1)
  return a / safe[None, :], norms


def _init(x, rank, key, init):
  factors = []
  keys = jax.random.split(key, x.ndim)
  for k in range(x.ndim):
    shape = (x.shape[k], rank)
    rand = jax.random.normal(keys[k], shape, x.dtype)
    if init == "random":
      factors.append(_normalize(rand)[0])
      continue
    unfold = jnp.moveaxis(x, k, 0).reshape(x.shape[k], -1)
    r = min(rank, *unfold.shape)
    u, _, _ = truncated_svd(unfold, r, "svd")
    if r < rank:  # more components than the mode has directions: fill with noise
      u = jnp.concatenate([u, _normalize(rand[:, r:])[0]], axis=1)
    factors.append(u)
  return tuple(factors)


@functools.partial(jax.jit, static_argnames=("rank", "n_iter", "init"))
def _cp_als(x, rank, key, n_iter, tol, init):
  n = x.ndim
  norm2 = jnp.sum(x * x)
  scale = jnp.sqrt(jnp.maximum(norm2, jnp.finfo(x.dtype).tiny))

  def sweep(factors):
    factors = list(factors)
    for k in range(n):
      v = _gram_hadamard(factors, k)
      m = _mttkrp(x, factors, k)
      a = jnp.matmul(m, pinv_hermitian(v), precision=HIGHEST)
      if k == n - 1:
        # ||x - xhat||^2 = ||x||^2 - 2 <x, xhat> + ||xhat||^2, from the last update's terms.
        inner = jnp.sum(m * a)
        norm_hat2 = jnp.sum(v * jnp.matmul(a.T, a, precision=HIGHEST))
        err = jnp.sqrt(jnp.maximum(norm2 - 2 * inner + norm_hat2, 0)) / scale
      factors[k], weights = _normalize(a)
    return tuple(factors), weights, err

  def cond(carry):
    i, _, _, err, prev, _ = carry
    return (i < n_iter) & (jnp.abs(prev - err) > tol)

  def body(carry):
    i, factors, _, err, _, hist = carry
    factors, weights, new = sweep(factors)
    return i + 1, factors, weights, new, err, hist.at[i].set(new)

  factors = _init(x, rank, key, init)
  hist = jnp.full((n_iter,), jnp.nan, x.dtype)
  inf = jnp.asarray(jnp.inf, x.dtype)
  ones = jnp.ones((rank,), x.dtype)
  carry = (0, factors, ones, inf, -inf, hist)
  _, factors, weights, _, _, hist = jax.lax.while_loop(cond, body, carry)
  return CP(weights, factors), hist


def cp_als(x, rank: int, *, key=None, n_iter: int = 100, tol: float = 1e-7, init: str = "svd"):
  """Rank-`R` CP decomposition by alternating least squares.

  Each update solves the normal equations with the pseudo-inverse of the Hadamard
  product of the other factors' Gram matrices, so rank-deficient input (more
  components than the tensor has) gives finite factors, never NaN. After each update
  the factor's columns are normalised and their norms become the weights.

  Args:
    x: array `(I_1, ..., I_N)`, `N >= 2`.
    rank: number of components `R >= 1`.
    key: PRNG key for `init="random"`, and for the columns an SVD init lacks when
      `R > I_k`; default `jax.random.key(0)`.
    n_iter: maximum number of ALS sweeps (>= 1).
    tol: stop when a sweep changes the relative error by less than `tol` (>= 0).
    init: `"svd"` (leading left singular vectors of each unfolding) or `"random"`.

  Returns:
    `(CP(weights (R,), factors (I_k, R) with unit columns), errors (n_iter,))`;
    `errors` is the relative error after each sweep, NaN for sweeps not run.
  """
  x = _checks.as_float_array(x, "x", min_ndim=2)
  _checks.check_rank(rank, "rank", 10**6)
  _checks.check_rank(n_iter, "n_iter", 10**6)
  if not tol >= 0:
    raise ValueError(f"tol must be >= 0, got {tol}.")
  if init not in ("svd", "random"):
    raise ValueError(f"init must be 'svd' or 'random', got {init!r}.")
  if x.ndim > len(_LETTERS):
    raise ValueError(f"x has {x.ndim} modes; cp_als supports at most {len(_LETTERS)}.")
  key = jax.random.key(0) if key is None else key
  x, s = _checks.normalized(x, "x")
  f, errors = _cp_als(x, rank, key, n_iter, jnp.asarray(tol, x.dtype), init)
  return scaled(f, s), errors
