"""Float64 numpy references, written independently of `decomp` (plain SVDs, loops)."""

from __future__ import annotations

import math

import numpy as np


def unfold(x, mode):
  return np.moveaxis(x, mode, 0).reshape(x.shape[mode], -1)


def tails(s):
  """tails[r] = ||s[r:]||_2 for r = 0..len(s)."""
  return np.sqrt(np.append(np.cumsum((s**2)[::-1])[::-1], 0.0))


def svd(m):
  """Thin SVD with the canonical signs of `decomp` (largest |entry| of each u column > 0)."""
  u, s, vt = np.linalg.svd(m, full_matrices=False)
  sign = np.where(u[np.argmax(np.abs(u), axis=0), np.arange(u.shape[1])] < 0, -1.0, 1.0)
  return u * sign, s, vt * sign[:, None]


def eps_rank(s, delta):
  t = tails(s)
  return next(r for r in range(1, len(s) + 1) if t[r] <= delta)


def low_rank_tucker(rng, shape, ranks):
  core = rng.standard_normal(ranks)
  x = core
  for k, (n, r) in enumerate(zip(shape, ranks, strict=True)):
    q, _ = np.linalg.qr(rng.standard_normal((n, r)))
    x = np.moveaxis(np.tensordot(x, q, axes=((k,), (1,))), -1, k)
  return x


def low_rank_cp(rng, shape, rank):
  factors = [rng.standard_normal((n, rank)) for n in shape]
  letters = "abcdefgh"[: len(shape)]
  return np.einsum(",".join(f"{c}z" for c in letters) + "->" + letters, *factors)


def random_tr(rng, shape, ranks):
  n = len(shape)
  return [rng.standard_normal((ranks[k], shape[k], ranks[(k + 1) % n])) for k in range(n)]


def tr_full(cores):
  x = cores[0]
  for g in cores[1:]:
    x = np.tensordot(x, g, axes=1)
  return np.trace(x, axis1=0, axis2=-1)


def tt_svd(x, eps):
  """Oseledets' TT-SVD at relative error eps; returns the ranks (R_1..R_{N-1}) and cores."""
  n = x.ndim
  delta = eps / math.sqrt(n - 1) * np.linalg.norm(x)
  cores, ranks, r_prev = [], [], 1
  m = x.reshape(x.shape[0], -1)
  for k in range(n - 1):
    u, s, vt = svd(m)
    r = eps_rank(s, delta)
    cores.append(u[:, :r].reshape(r_prev, x.shape[k], r))
    ranks.append(r)
    m = (s[:r, None] * vt[:r]).reshape(r * x.shape[k + 1], -1)
    r_prev = r
  cores.append(m.reshape(r_prev, x.shape[-1], 1))
  return tuple(ranks), cores


def tr_svd(x, eps, r0):
  """Zhao et al.'s TR-SVD at relative error eps with first split R_0 = r0 (must divide).

  Returns the ring ranks (R_0..R_{N-1}), or None if r0 does not divide the first rank.
  """
  n = x.ndim
  delta = eps / math.sqrt(n - 1) * np.linalg.norm(x)
  u, s, vt = svd(x.reshape(x.shape[0], -1))
  r = eps_rank(s, delta)
  if r % r0:
    return None, None
  r1 = r // r0
  cores = [u[:, :r].reshape(x.shape[0], r0, r1).transpose(1, 0, 2)]
  rest = (s[:r, None] * vt[:r]).reshape(r0, r1, *x.shape[1:])
  m = np.moveaxis(rest, 0, -1).reshape(r1 * x.shape[1], -1)
  ranks, r_prev = [r0, r1], r1
  for k in range(1, n - 1):
    u, s, vt = svd(m)
    rk = eps_rank(s, delta)
    cores.append(u[:, :rk].reshape(r_prev, x.shape[k], rk))
    ranks.append(rk)
    m = (s[:rk, None] * vt[:rk]).reshape(rk * x.shape[k + 1], -1)
    r_prev = rk
  cores.append(m.reshape(r_prev, x.shape[-1], r0))
  return tuple(ranks), cores


def tr_storage(shape, ranks):
  n = len(shape)
  return sum(ranks[k] * shape[k] * ranks[(k + 1) % n] for k in range(n))
