"""Rank rules: choose static ranks on the host, once, from a shape or from the data.

Three kinds of rule, as the three methods use them:
- parameter ratio: keep (at most) a fraction `ratio` of the kernel's numbers;
- relative error `eps`: the smallest ranks whose truncation error bound is `<= eps`
  (TT/TR take `eps` directly: `tt_svd(x, eps=...)`, `tr_svd`, `rsdtr`);
- VBMF (Nakajima et al. 2013), as used for Tucker-2 ranks by Kim et al. 2016.

All take and return Python ints; nothing here runs under `jit`.
"""

from __future__ import annotations

import math

import numpy as np

from decomp import _checks


def _kernel_shape(shape) -> tuple:
  if len(shape) != 4:
    raise ValueError(f"kernel shape must be (d_h, d_w, S, T), got {tuple(shape)}.")
  return tuple(int(s) for s in shape)


def tucker2_params(shape, ranks) -> int:
  d_h, d_w, s, t = shape
  r_s, r_t = ranks
  return s * r_s + d_h * d_w * r_s * r_t + r_t * t


def tucker2_ranks(shape, *, ratio: float) -> tuple:
  """Tucker-2 ranks `(r_S, r_T)` in proportion to `(S, T)` storing at most `ratio` of the kernel.

  Solves `d^2 a^2 S T + a (S^2 + T^2) = ratio d^2 S T` for the fraction `a` of the channels
  kept, rounds down, and never goes below rank 1 (then only `(1, 1)` may exceed `ratio`).
  """
  d_h, d_w, s, t = _kernel_shape(shape)
  ratio = _checks.check_ratio(ratio)
  dd = d_h * d_w
  qa, qb, qc = dd * s * t, s * s + t * t, -ratio * dd * s * t
  a = (-qb + math.sqrt(qb * qb - 4 * qa * qc)) / (2 * qa)
  r_s, r_t = max(1, min(s, int(a * s))), max(1, min(t, int(a * t)))
  # Raising a rank to 1 can overshoot the budget; shrink the relatively larger rank.
  while tucker2_params((d_h, d_w, s, t), (r_s, r_t)) > ratio * dd * s * t and r_s * r_t > 1:
    if r_s * t >= r_t * s and r_s > 1:
      r_s -= 1
    else:
      r_t -= 1
  return r_s, r_t


def lowered_svd_rank(shape, *, ratio: float) -> int:
  """Lowered-SVD rank storing at most `ratio` of the kernel: `r (S d^2 + T) <= ratio S d^2 T`."""
  d_h, d_w, s, t = _kernel_shape(shape)
  ratio = _checks.check_ratio(ratio)
  n = s * d_h * d_w
  return max(1, min(t, n, int(ratio * n * t // (n + t))))


def cp_rank(shape, *, ratio: float) -> int:
  """CP rank `R` storing at most `ratio` of the tensor: `R (sum_k I_k + 1) <= ratio prod_k I_k`."""
  ratio = _checks.check_ratio(ratio)
  return max(1, int(ratio * math.prod(shape) // (sum(shape) + 1)))


def tt_ranks(shape, *, ratio: float) -> tuple:
  """Largest uniform TT rank (capped by each bond's maximum) storing at most `ratio`."""
  ratio = _checks.check_ratio(ratio)
  budget = ratio * math.prod(shape)
  n = len(shape)
  maxima = [min(math.prod(shape[: k + 1]), math.prod(shape[k + 1 :])) for k in range(n - 1)]

  def ranks_for(r):
    return tuple(min(r, m) for m in maxima)

  def storage(ranks):
    full = (1, *ranks, 1)
    return sum(full[k] * shape[k] * full[k + 1] for k in range(n))

  r = 1
  while r < max(maxima, default=1) and storage(ranks_for(r + 1)) <= budget:
    r += 1
  return ranks_for(r)


def tr_ranks(shape, *, ratio: float) -> tuple:
  """Largest uniform ring rank `R` (all `R_k = R`) storing at most `ratio`; `R^2 <= I_1` so
  that TR-SVD can reach it. Storage `R^2 sum_k I_k`."""
  ratio = _checks.check_ratio(ratio)
  r = int(math.sqrt(ratio * math.prod(shape) / sum(shape)))
  r = max(1, min(r, math.isqrt(shape[0])))
  return (r,) * len(shape)


def _unfold(x: np.ndarray, mode: int) -> np.ndarray:
  return np.moveaxis(x, mode, 0).reshape(x.shape[mode], -1)


def _eps_rank(s: np.ndarray, delta: float) -> int:
  tails = np.cumsum((s * s)[::-1])[::-1]
  return 1 + int(np.sum(tails[1:] > delta * delta))


def tucker2_ranks_eps(kernel, *, eps: float) -> tuple:
  """Smallest Tucker-2 ranks whose HOSVD bound gives relative error `<= eps`.

  The HOSVD error is at most `sqrt(tail_S^2 + tail_T^2)`; each mode gets `eps / sqrt(2)`.
  """
  k = np.asarray(kernel, np.float64)
  _kernel_shape(k.shape)
  eps = _checks.check_eps(eps)
  delta = eps / math.sqrt(2) * np.linalg.norm(k)
  return tuple(_eps_rank(np.linalg.svd(_unfold(k, m), compute_uv=False), delta) for m in (2, 3))


def lowered_svd_rank_eps(kernel, *, eps: float) -> int:
  """Smallest lowered-SVD rank with relative error `<= eps` (Eckart-Young)."""
  k = np.asarray(kernel, np.float64)
  _kernel_shape(k.shape)
  eps = _checks.check_eps(eps)
  s = np.linalg.svd(k.reshape(-1, k.shape[3]), compute_uv=False)
  return _eps_rank(s, eps * np.linalg.norm(k))


# ---------------------------------------------------------------------------------------------
# VBMF


def _tau(x, alpha):
  return 0.5 * (x - (1 + alpha) + np.sqrt((x - (1 + alpha)) ** 2 - 4 * alpha))


def _evb_objective(sigma2, big_l, big_m, s, residual, xubar):
  h = len(s)
  alpha = big_l / big_m
  x = s**2 / (big_m * sigma2)
  z1, z2 = x[x > xubar], x[x <= xubar]
  tau_z1 = _tau(z1, alpha)
  obj = np.sum(z2 - np.log(z2)) + np.sum(z1 - tau_z1)
  obj += np.sum(np.log((tau_z1 + 1) / z1)) + alpha * np.sum(np.log(tau_z1 / alpha + 1))
  return obj + residual / (big_m * sigma2) + (big_l - h) * np.log(sigma2)


def _golden_min(f, lo, hi, iters=200):
  """Minimum of a unimodal `f` on `[lo, hi]` by golden-section search (deterministic)."""
  g = (math.sqrt(5) - 1) / 2
  a, b = lo, hi
  c, d = b - g * (b - a), a + g * (b - a)
  fc, fd = f(c), f(d)
  for _ in range(iters):
    if fc < fd:
      b, d, fd = d, c, fc
      c = b - g * (b - a)
      fc = f(c)
    else:
      a, c, fc = c, d, fd
      d = a + g * (b - a)
      fd = f(d)
  return (a + b) / 2


def vbmf_rank(matrix) -> int:
  """Rank chosen by empirical variational Bayesian matrix factorisation (EVBMF).

  The analytic global solution of Nakajima, Sugiyama, Babacan & Tomioka (JMLR 2013),
  with the noise variance estimated by minimising the free energy over its analytic
  bounds (their Theorem 6/Corollary 1), as in the reference code Kim et al. 2016 used.
  Singular components above the threshold `sqrt(M sigma^2 (1 + tau)(1 + alpha / tau))`
  are kept. Returns at least 1.

  Args:
    matrix: `(L, M)` finite; transposed internally so that `L <= M`.
  """
  y = np.asarray(matrix, np.float64)
  if y.ndim != 2 or not np.all(np.isfinite(y)):
    raise ValueError(f"vbmf_rank: matrix must be 2-way and finite, got shape {y.shape}.")
  if y.shape[0] > y.shape[1]:
    y = y.T
  big_l, big_m = y.shape
  h = big_l
  alpha = big_l / big_m
  tauubar = 2.5129 * math.sqrt(alpha)
  s = np.linalg.svd(y, compute_uv=False)[:h]
  residual = 0.0
  xubar = (1 + tauubar) * (1 + alpha / tauubar)
  eh_ub = int(min(math.ceil(big_l / (1 + alpha)) - 1, h)) - 1
  upper = (np.sum(s**2) + residual) / (big_l * big_m)
  lower = max(s[eh_ub + 1] ** 2 / (big_m * xubar), np.mean(s[eh_ub + 1 :] ** 2) / big_m)
  if upper <= lower:
    sigma2 = upper
  else:
    sigma2 = _golden_min(
      lambda v: _evb_objective(v, big_l, big_m, s, residual, xubar), lower, upper
    )
  threshold = math.sqrt(big_m * sigma2 * (1 + tauubar) * (1 + alpha / tauubar))
  return max(1, int(np.sum(s > threshold)))


def tucker2_ranks_vbmf(kernel) -> tuple:
  """Tucker-2 ranks `(r_S, r_T)` by EVBMF of the channel unfoldings (Kim et al. 2016)."""
  k = np.asarray(kernel, np.float64)
  _kernel_shape(k.shape)
  return vbmf_rank(_unfold(k, 2)), vbmf_rank(_unfold(k, 3))
