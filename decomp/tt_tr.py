"""Tensor-train and tensor-ring decompositions by sequential truncated SVD (TT-SVD,
TR-SVD).

Both run the same sweep: unfold, truncate, keep the left factor as a core, carry
`rest = u^T m` on to the next mode. With static `ranks` the sweep truncates to them.
With `eps` the ranks depend on the data, and the sweep runs once at the largest
ranks the shapes allow, zeroing (masking) the columns past each data-chosen rank;
the ranks come back to the host, which slices the zero padding off. So an `eps`
decomposition is one jitted call with static shapes plus one small transfer, and
the same masked sweep serves the RSDTR search (`decomp.rsdtr`).

Error control (Oseledets 2011; Zhao et al. 2016): every truncation discards a tail
of norm at most `delta = eps / sqrt(N - 1) * ||x||`. The kept left factors are
orthonormal, so the N - 1 discarded parts are orthogonal and the total relative
error is at most `eps`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from decomp import _checks
from decomp._linalg import mask_columns, tail_rank, truncated_svd
from decomp.factors import TR, TT, scaled


def _sweep(t: jax.Array, ranks, delta, method: str, r_in_real=None, r0_real=None):
  """TT-SVD sweep over `t` `(r_in, I_1, ..., I_n, q)`.

  Args:
    ranks: `n - 1` static ranks, or None for full ranks masked by the tail rule.
    delta: tail bound per truncation (masked mode only).
    r_in_real, r0_real: how many of the `r_in` leading and `q` trailing slices are not
      zero padding (masked mode; they bound the ranks as the unpadded matrices would).
      Default `r_in` and `q`.

  Returns:
    `(cores, found)`: cores `(r_{k-1}, I_k, r_k)` with the last `(r_{n-1}, I_n, q)`;
    `found` the masked ranks `(n - 1,)` int32, or None with static ranks.
  """
  r_in, dims, q = t.shape[0], t.shape[1:-1], t.shape[-1]
  cores, found = [], []
  r_prev, r_prev_real = r_in, (r_in if r_in_real is None else r_in_real)
  m = t.reshape(r_in * dims[0], -1)
  for k in range(len(dims) - 1):
    cap = min(m.shape) if ranks is None else ranks[k]
    u, s, rest = truncated_svd(m, cap, method)
    if ranks is None:
      rows = dims[k] * r_prev_real
      cols = math.prod(dims[k + 1 :]) * (q if r0_real is None else r0_real)
      r = capped_rank(s, delta, rows, cols)
      u, rest = mask_columns(u, rest, r)
      found.append(r)
      r_prev_real = r
    cores.append(u.reshape(r_prev, dims[k], cap))
    r_prev = cap
    m = rest.reshape(cap * dims[k + 1], -1)
  cores.append(m.reshape(r_prev, dims[-1], q))
  return cores, (jnp.stack(found) if found else None)


def capped_rank(s, delta, rows, cols):
  """The tail rank of `s` at `delta`, never more than the unpadded unfolding's rank
  `min(rows, cols)`: noise in zero padding must not inflate a rank past what the real
  matrix can have."""
  return jnp.minimum(tail_rank(s, delta), jnp.minimum(rows, cols))


def _delta(x: jax.Array, eps) -> jax.Array:
  n = max(x.ndim - 1, 1)
  return jnp.asarray(eps / math.sqrt(n), x.dtype) * jnp.linalg.norm(x.ravel())


def _trim(cores, ranks) -> tuple:
  """Slices cores `(P_{k-1}, I_k, P_k)` to ring ranks `ranks` (`R_0 .. R_{N-1}`)."""
  n = len(cores)
  return tuple(cores[k][: ranks[k], :, : ranks[(k + 1) % n]] for k in range(n))


# ---------------------------------------------------------------------------------------------
# Tensor train


@functools.partial(jax.jit, static_argnames=("ranks", "method"))
def _tt_static(x, ranks, method):
  cores, _ = _sweep(x[None, ..., None], ranks, None, method)
  return TT(tuple(cores))


@functools.partial(jax.jit, static_argnames=("method",))
def _tt_eps(x, eps, method):
  return _sweep(x[None, ..., None], None, _delta(x, eps), method)


def tt_max_ranks(shape) -> tuple:
  """The largest TT ranks `(R_1, ..., R_{N-1})` a tensor of `shape` can have."""
  return tuple(
    min(math.prod(shape[: k + 1]), math.prod(shape[k + 1 :])) for k in range(len(shape) - 1)
  )


def tt_svd(x, *, ranks=None, eps=None, method: str = "gram") -> TT:
  """TT-SVD (Oseledets 2011).

  Args:
    x: array `(I_1, ..., I_N)`.
    ranks: internal ranks `(R_1, ..., R_{N-1})` or one int for all;
      `1 <= R_k <= min(R_{k-1} I_k, I_{k+1} ... I_N)`.
    eps: relative error bound in (0, 1); ranks are then the smallest the bound allows.
      Give exactly one of `ranks`, `eps`.
    method: `"gram"` or `"svd"` (see `decomp._linalg`).

  Returns:
    `TT(cores)`, core `k` `(R_{k-1}, I_k, R_k)`, `R_0 = R_N = 1`; every core but the
    last is left-orthonormal (its `(R_{k-1} I_k, R_k)` unfolding has orthonormal columns).
  """
  x = _checks.as_float_array(x, "x")
  _checks.one_of_ranks_eps(ranks, eps, "tt_svd")
  method = _checks.check_method(method)
  n = x.ndim
  if ranks is not None:
    ranks = _checks.rank_tuple(ranks, n - 1, "ranks")
    r_prev = 1
    for k, r in enumerate(ranks):
      hi = min(r_prev * x.shape[k], math.prod(x.shape[k + 1 :]))
      r_prev = _checks.check_rank(r, f"tt_svd: ranks[{k}]", hi)
    x, s = _checks.normalized(x, "x")
    return scaled(_tt_static(x, ranks, method), s)
  eps = _checks.check_eps(eps)
  x, s = _checks.normalized(x, "x")
  cores, found = _tt_eps(x, eps, method)
  inner = () if found is None else tuple(int(r) for r in np.asarray(found))
  return scaled(TT(_trim(cores, (1, *inner))), s)


# ---------------------------------------------------------------------------------------------
# Tensor ring


@functools.partial(jax.jit, static_argnames=("ranks", "method"))
def _tr_static(x, ranks, method):
  r0, r1 = ranks[0], ranks[1]
  u, _, rest = truncated_svd(x.reshape(x.shape[0], -1), r0 * r1, method)
  first = u.reshape(x.shape[0], r0, r1).transpose(1, 0, 2)
  t = jnp.moveaxis(rest.reshape(r0, r1, *x.shape[1:]), 0, -1)
  cores, _ = _sweep(t, ranks[2:], None, method)
  return TR((first, *cores))


@functools.partial(jax.jit, static_argnames=("method",))
def tr_first(x, method):
  """First TR-SVD step at full rank: `u (I_1, n)`, singular values `(n,)`, `rest (n, I_2..I_N)`."""
  m = x.reshape(x.shape[0], -1)
  u, s, rest = truncated_svd(m, min(m.shape), method)
  return u, s, rest.reshape(-1, *x.shape[1:])


def split_first_rank(u, rest, r0, r1, p0: int, p1: int):
  """The split `r0 * r1` of the first rank, zero-padded to the static `(p0, p1)`.

  Returns the first core `(p0, I_1, p1)` and the remainder `t` `(p1, I_2, ..., I_N, p0)`
  (`R_0` moved to the end) with which the TT-SVD sweep goes on.
  """
  r0, r1 = jnp.asarray(r0, jnp.int32), jnp.asarray(r1, jnp.int32)
  a = jnp.arange(p0, dtype=jnp.int32)[:, None]
  b = jnp.arange(p1, dtype=jnp.int32)[None, :]
  valid = (a < r0) & (b < r1)
  idx = jnp.where(valid, a * r1 + b, 0)
  first = jnp.where(valid[None], u[:, idx], 0).transpose(1, 0, 2)
  pad = valid.reshape(p0, p1, *([1] * (rest.ndim - 1)))
  return first, jnp.moveaxis(jnp.where(pad, rest[idx], 0), 0, -1)


def tr_rest(u, rest, r0, r1, delta, p0: int, p1: int, method: str):
  """TR-SVD after the first step, for the split `r0 * r1` of the first rank.

  `r0`, `r1` and `delta` are traced; the split enters the shapes only through the
  static pads `p0 >= r0`, `p1 >= r1`, so one compilation serves every split that
  fits. Returns the padded cores (first `(p0, I_1, p1)`) and the masked ranks
  `(R_2, ..., R_{N-1})`.
  """
  first, t = split_first_rank(u, rest, r0, r1, p0, p1)
  cores, found = _sweep(t, None, delta, method, r_in_real=r1, r0_real=r0)
  if found is None:
    found = jnp.zeros((0,), jnp.int32)
  return (first, *cores), found


tr_rest_jit = jax.jit(tr_rest, static_argnames=("p0", "p1", "method"))


def divisor_pairs(r: int) -> list:
  """All `(r0, r1)` with `r0 * r1 == r`, `r0` ascending."""
  return [(d, r // d) for d in range(1, r + 1) if r % d == 0]


def balancedsplit_first_rank(r: int) -> int:
  """The largest `r0 <= sqrt(r)` dividing `r`: the most balanced split `r0 <= r1`."""
  return max(d for d, _ in divisor_pairs(r) if d * d <= r)


def tr_max_ranks(shape, r0: int, r1: int) -> tuple:
  """The largest ring ranks `(R_0, ..., R_{N-1})` TR-SVD can reach after the split `r0 * r1`."""
  ranks = [r0, r1]
  for k in range(1, len(shape) - 1):
    ranks.append(min(ranks[-1] * shape[k], math.prod(shape[k + 1 :]) * r0))
  return tuple(ranks)


def tr_svd(x, *, ranks=None, eps=None, split=None, method: str = "gram") -> TR:
  """TR-SVD (Zhao et al. 2016, "Tensor ring decomposition", Algorithm 1).

  The first step truncates the mode-1 unfolding to rank `R_0 R_1` and splits its left
  factor into the first core `(R_0, I_1, R_1)`; `R_0` moves to the end of the remainder,
  and a TT-SVD sweep over `(R_1 I_2, ..., I_N R_0)` gives the other cores.

  Args:
    x: array `(I_1, ..., I_N)`, `N >= 2`.
    ranks: ring ranks `(R_0, R_1, ..., R_{N-1})`, core `k` being `(R_{k-1}, I_k, R_k)` and
      `R_N = R_0`. Requires `R_0 R_1 <= min(I_1, I_2 ... I_N)` and
      `R_k <= min(R_{k-1} I_k, I_{k+1} ... I_N R_0)`.
    eps: relative error bound in (0, 1); each of the `N - 1` truncations keeps its tail
      under `eps / sqrt(N - 1) * ||x||`. Give exactly one of `ranks`, `eps`.
    split: with `eps`, `R_0` for the first rank `r = R_0 R_1` (must divide `r`); default the
      most balanced divisor pair, `R_0 <= R_1`. Zhao et al. leave the split free;
      `decomp.rsdtr` searches all of them.
    method: `"gram"` or `"svd"`.

  Returns:
    `TR(cores)`, core `k` `(R_{k-1}, I_k, R_k)`.
  """
  x = _checks.as_float_array(x, "x", min_ndim=2)
  _checks.one_of_ranks_eps(ranks, eps, "tr_svd")
  method = _checks.check_method(method)
  n = x.ndim
  if ranks is not None:
    if split is not None:
      raise ValueError("tr_svd: split= goes with eps=; with ranks= the split is ranks[0:2].")
    ranks = _checks.rank_tuple(ranks, n, "ranks")
    for k in (0, 1):
      _checks.check_rank(ranks[k], f"tr_svd: ranks[{k}]", x.size)
    first_max = min(x.shape[0], x.size // x.shape[0])
    if ranks[0] * ranks[1] > first_max:
      raise ValueError(
        f"tr_svd: ranks[0] * ranks[1] = {ranks[0] * ranks[1]} exceeds the rank "
        f"bound {first_max} of the mode-1 unfolding; allowed range [1, {first_max}]."
      )
    for k in range(2, n):
      hi = min(ranks[k - 1] * x.shape[k - 1], math.prod(x.shape[k:]) * ranks[0])
      _checks.check_rank(ranks[k], f"tr_svd: ranks[{k}]", hi)
    x, s = _checks.normalized(x, "x")
    return scaled(_tr_static(x, ranks, method), s)
  eps = _checks.check_eps(eps)
  x, scale = _checks.normalized(x, "x")
  delta = _delta(x, eps)
  u, s, rest = tr_first(x, method)
  r = int(tail_rank(s, delta))
  if split is None:
    r0 = balancedsplit_first_rank(r)
  else:
    r0 = _checks.check_rank(split, "split", r)
    if r % r0:
      raise ValueError(
        f"split={r0} does not divide the first rank {r}; allowed: "
        f"{[d for d, _ in divisor_pairs(r)]}."
      )
  r1 = r // r0
  cores, found = tr_rest_jit(u, rest, r0, r1, delta, p0=r0, p1=r1, method=method)
  return scaled(TR(_trim(cores, (r0, r1, *(int(v) for v in np.asarray(found))))), scale)
