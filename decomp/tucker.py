"""Tucker decompositions: truncated HOSVD, HOOI, and Tucker-2 of conv kernels."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from decomp import _checks
from decomp._linalg import cholesky_qr, mm, truncated_svd
from decomp.factors import Tucker, mode_product, scaled


def _unfold(x: jax.Array, mode: int) -> jax.Array:
  return jnp.moveaxis(x, mode, 0).reshape(x.shape[mode], -1)


def _leading(x: jax.Array, mode: int, r: int, method: str) -> jax.Array:
  u, _, _ = truncated_svd(_unfold(x, mode), r, method)
  return u


def _project(x: jax.Array, factors, skip: int | None = None) -> jax.Array:
  """`x x_k U_k^T` for every factored mode `k != skip`."""
  for k, u in enumerate(factors):
    if u is not None and k != skip:
      x = mode_product(x, u.T, k)
  return x


def _check_ranks(x: jax.Array, ranks, fn: str) -> tuple:
  ranks = _checks.rank_tuple(ranks, x.ndim, "ranks")
  size = x.size
  for k, r in enumerate(ranks):
    if r is not None:
      # The mode-k unfolding is (I_k, size / I_k); its rank bounds the Tucker rank.
      _checks.check_rank(r, f"{fn}: ranks[{k}]", min(x.shape[k], size // x.shape[k]))
  return ranks


@functools.partial(jax.jit, static_argnames=("ranks", "method"))
def _hosvd(x, ranks, method):
  # `x` comes normalised (max|x| = 1) from every caller: `_checks.normalized`.
  factors = tuple(None if r is None else _leading(x, k, r, method) for k, r in enumerate(ranks))
  return Tucker(_project(x, factors), factors)


def hosvd(x, ranks, *, method: str = "gram") -> Tucker:
  """Truncated higher-order SVD (De Lathauwer et al. 2000).

  Factor `k` holds the `r_k` leading left singular vectors of the mode-`k` unfolding;
  the core is `x x_1 U_1^T ... x_N U_N^T`. With orthonormal factors the squared error
  is at most the sum of the modes' truncation tails, hence at most `N` times the
  squared error of the best Tucker approximation of the same ranks.

  Args:
    x: array `(I_1, ..., I_N)`.
    ranks: `(r_1, ..., r_N)` (or one int for all modes); `None` leaves a mode alone
      (no factor, the core keeps `I_k`). `1 <= r_k <= min(I_k, prod_{j != k} I_j)`.
    method: `"gram"` (eigh of the mode Gram matrices; fast) or `"svd"` (exact reference).

  Returns:
    `Tucker(core (r_1, ..., r_N), factors)`, factors `(I_k, r_k)` orthonormal or None.
  """
  x, dtype = _checks.half_to_float32(_checks.as_float_array(x, "x"))
  ranks = _check_ranks(x, ranks, "hosvd")
  x, s = _checks.normalized(x, "x")
  return _checks.cast_floats(scaled(_hosvd(x, ranks, _checks.check_method(method)), s), dtype)


def tucker2(kernel, ranks, *, method: str = "gram") -> Tucker:
  """Tucker-2 of a conv kernel: Tucker on the two channel modes only (Kim et al. 2016).

  Args:
    kernel: Flax conv kernel `(d_h, d_w, S, T)`.
    ranks: `(r_S, r_T)`, `1 <= r_S <= S`, `1 <= r_T <= T` (and at most the size of the
      other modes together, the rank bound of the unfolding).
    method: `"gram"` or `"svd"`, as in `hosvd`.

  Returns:
    `Tucker(core (d_h, d_w, r_S, r_T), (None, None, U_S (S, r_S), U_T (T, r_T)))`. As a
    conv: 1x1 S->r_S with `U_S`, d_h x d_w conv r_S->r_T with the core, 1x1 r_T->T with
    `U_T^T`.
  """
  kernel, dtype = _checks.half_to_float32(_checks.as_kernel(kernel))
  if not isinstance(ranks, (tuple, list)) or len(ranks) != 2:
    raise ValueError(f"tucker2: ranks must be a pair (r_S, r_T), got {ranks!r}.")
  for i, (r, mode) in enumerate(zip(ranks, (2, 3), strict=True)):  # named as the caller wrote
    hi = min(kernel.shape[mode], kernel.size // kernel.shape[mode])
    _checks.check_rank(r, f"tucker2: ranks[{i}] ({'r_S' if i == 0 else 'r_T'})", hi)
  full = _check_ranks(kernel, (None, None, *ranks), "tucker2")
  kernel, s = _checks.normalized(kernel, "kernel")
  f = _hosvd(kernel, full, _checks.check_method(method))
  return _checks.cast_floats(scaled(f, s), dtype)


@functools.partial(jax.jit, static_argnames=("ranks", "n_iter", "method"))
def _hooi(x, ranks, n_iter, tol, method):
  norm2 = jnp.sum(x * x)
  scale = jnp.sqrt(jnp.maximum(norm2, jnp.finfo(x.dtype).tiny))
  init = _hosvd(x, ranks, method)
  modes = [k for k, r in enumerate(ranks) if r is not None]

  def rel_err(core):
    return jnp.sqrt(jnp.maximum(norm2 - jnp.sum(core * core), 0)) / scale

  def sweep(factors):
    factors = list(factors)
    for k in modes:
      factors[k] = _leading(_project(x, factors, skip=k), k, ranks[k], method)
    factors = tuple(factors)
    return factors, _project(x, factors)

  def cond(carry):
    i, _, err, prev, _ = carry
    return (i < n_iter) & (jnp.abs(prev - err) > tol)

  def body(carry):
    i, factors, err, _, hist = carry
    factors, core = sweep(factors)
    new = rel_err(core)
    return i + 1, factors, new, err, hist.at[i].set(new)

  hist = jnp.full((n_iter,), jnp.nan, x.dtype)
  err0 = rel_err(init.core)
  inf = jnp.asarray(jnp.inf, x.dtype)
  _, factors, _, _, hist = jax.lax.while_loop(cond, body, (0, init.factors, err0, inf, hist))
  return Tucker(_project(x, factors), factors), hist


def hooi(x, ranks, *, n_iter: int = 20, tol: float = 1e-6, method: str = "gram"):
  """Higher-order orthogonal iteration: HOSVD refined by alternating subspace updates.

  Each sweep replaces factor `k` by the leading left singular vectors of the mode-`k`
  unfolding of `x` projected on the other factors; the error never increases.

  Args:
    x, ranks, method: as in `hosvd`.
    n_iter: maximum number of sweeps (>= 1).
    tol: stop when a sweep lowers the relative error by less than `tol` (>= 0).

  Returns:
    `(Tucker, errors)`: `errors (n_iter,)` holds the relative error after each sweep,
    NaN for the sweeps not run.
  """
  x = _checks.as_float_array(x, "x")
  ranks = _check_ranks(x, ranks, "hooi")
  kept = [n if r is None else r for n, r in zip(x.shape, ranks, strict=True)]
  for k, r in enumerate(ranks):
    others = math.prod(kept[:k] + kept[k + 1 :])
    if r is not None and r > others:  # a sweep's projected unfolding is (I_k, others)
      raise ValueError(
        f"hooi: ranks[{k}] = {r} exceeds {others}, the product of the other modes' ranks "
        f"(their sizes where None), which bounds it; allowed range [1, "
        f"{min(x.shape[k], others)}]."
      )
  _checks.check_rank(n_iter, "n_iter", 10**6)
  if not tol >= 0:
    raise ValueError(f"tol must be >= 0, got {tol}.")
  x, s = _checks.normalized(x, "x")
  f, errors = _hooi(x, ranks, n_iter, jnp.asarray(tol, x.dtype), _checks.check_method(method))
  return scaled(f, s), errors


@functools.partial(jax.jit, static_argnames=("ranks", "n_sweeps", "oversample"))
def _tucker2_sweep(kernel, ranks, n_sweeps, oversample, key):
  w_s = _unfold(kernel, 2)  # (S, d_h d_w T)
  w_t = _unfold(kernel, 3)  # (T, d_h d_w S)
  b_s, b_t = (min(n, r + oversample) for n, r in zip(kernel.shape[2:], ranks, strict=True))
  k_s, k_t = jax.random.split(key)
  # Randomized range finder with one power step: the start of the sweeps.
  u_s = cholesky_qr(mm(w_s, mm(w_s.T, jax.random.normal(k_s, (w_s.shape[0], b_s), w_s.dtype))))
  u_t = cholesky_qr(mm(w_t, mm(w_t.T, jax.random.normal(k_t, (w_t.shape[0], b_t), w_t.dtype))))
  for _ in range(n_sweeps):
    m = _unfold(mode_product(kernel, u_t.T, 3), 2)  # (S, d_h d_w b_T)
    u_s = cholesky_qr(mm(m, mm(m.T, u_s)))
    m = _unfold(mode_product(kernel, u_s.T, 2), 3)  # (T, d_h d_w b_S)
    u_t = cholesky_qr(mm(m, mm(m.T, u_t)))
  if oversample:
    # Rayleigh-Ritz: the best r_S-dimensional subspace of span(U_S) for the kernel projected
    # on the (oversampled) U_T, then the best r_T-dimensional one of span(U_T) given U_S.
    u_s = _ritz(u_s, _unfold(mode_product(kernel, u_t.T, 3), 2), ranks[0])
    u_t = _ritz(u_t, _unfold(mode_product(kernel, u_s.T, 2), 3), ranks[1])
  factors = (None, None, u_s, u_t)
  return Tucker(_project(kernel, factors), factors)


def _ritz(u: jax.Array, m: jax.Array, r: int) -> jax.Array:
  """The `r` leading Ritz vectors of `m m^T` in the span of `u`'s orthonormal columns: `u`
  times the leading left singular vectors of `u^T m`."""
  return mm(u, truncated_svd(mm(u.T, m), r, "gram")[0])


def tucker2_sweep(
  kernel, ranks, *, n_sweeps: int = 2, oversample: int = 0, seed: int = 0
) -> Tucker:
  """Tucker-2 by alternating subspace iteration: matrix products, and at most two small
  eigenproblems.

  HOOI with its inner eigenproblems replaced by one subspace-iteration step each: from a
  randomized range-finder start (one power step, fixed `seed`), each sweep updates `U_S`
  from the kernel projected on `U_T`, then `U_T` from the kernel projected on `U_S`, each
  followed by `decomp._linalg.cholesky_qr`. On a 2-core CPU the eigendecompositions are
  most of `tucker2`'s time, so this is the fast route there.

  With `oversample = p > 0` the sweeps carry `r + p` columns per mode (at most the mode's
  size), and Rayleigh-Ritz then keeps the best `r` of them (an eigenproblem of size `r + p`
  per mode). Subspace iteration converges like `(s_{b+1} / s_r)^2` for a block of `b`
  columns, so a few extra columns fix the slow convergence on steep spectra.

  Its error is not HOSVD's. Measured on the 31 ResNet-32 kernel shapes at ranks C/4
  (network relative error): random He-normal kernels, HOSVD 0.9206, 1/2/4/8 sweeps
  0.9223/0.9108/0.9024/0.8969 (below HOSVD from 2 sweeps, as HOOI is); the same kernels
  with channel spectra decaying geometrically to 1e-3, HOSVD 0.2048, sweeps
  0.2212/0.2125/0.2070/0.2054 (3.8% above HOSVD at 2 sweeps, 0.3% at 8). One sweep with
  `oversample=4`: 0.9173 and 0.2051 (0.15% above HOSVD; 2 plain sweeps 0.2129 on that
  draw of the steep kernels); with 8: 0.9141 and 0.2048. The oversampled sweep is meant
  for accelerators, where products are cheap and eigenproblems are not; its time against
  HOSVD is `benchmarks.decomp`'s (method `sweep_os`; the README has the figures).
  Enough sweeps converge to HOOI (tested). An exactly rank-`(r_S, r_T)` kernel is
  recovered exactly. Factor signs are not canonical.

  Args:
    kernel: Flax conv kernel `(d_h, d_w, S, T)`.
    ranks: `(r_S, r_T)`, as in `tucker2`.
    n_sweeps: alternating sweeps, >= 1.
    oversample: extra columns per mode during the sweeps, >= 0.
    seed: seed of the random start.

  Returns:
    `Tucker(core (d_h, d_w, r_S, r_T), (None, None, U_S, U_T))`, orthonormal factors.
  """
  kernel = _checks.as_kernel(kernel)
  if not isinstance(ranks, (tuple, list)) or len(ranks) != 2:
    raise ValueError(f"tucker2_sweep: ranks must be a pair (r_S, r_T), got {ranks!r}.")
  full = _check_ranks(kernel, (None, None, *ranks), "tucker2_sweep")
  if not isinstance(n_sweeps, int) or n_sweeps < 1:
    raise ValueError(f"n_sweeps must be an int >= 1, got {n_sweeps!r}.")
  if not isinstance(oversample, int) or oversample < 0:
    raise ValueError(f"oversample must be an int >= 0, got {oversample!r}.")
  kernel, s = _checks.normalized(kernel, "kernel")
  return scaled(_tucker2_sweep(kernel, full[2:], n_sweeps, oversample, jax.random.key(seed)), s)
