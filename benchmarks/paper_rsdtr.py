"""The RSDTR search as its authors run it: a Python loop over shifts and splits, each
candidate a full TR-SVD from scratch, one numpy SVD call at a time, in float32.

This is the peer `benchmarks.decomp` measures `decomp.rsdtr` against. It follows
Zhao et al.'s TR-SVD with the eps split of `decomp.tr_svd` and the sign convention of
`decomp._linalg` (the sign of singular vectors changes TR-SVD's ranks; see there).
"""

from __future__ import annotations

import math

import numpy as np


def _svd(m):
  u, s, vt = np.linalg.svd(m, full_matrices=False)
  sign = np.where(u[np.argmax(np.abs(u), axis=0), np.arange(u.shape[1])] < 0, -1, 1).astype(u.dtype)
  return u * sign, s, vt * sign[:, None]


def _rank(s, delta):
  tails = np.cumsum((s.astype(np.float64) ** 2)[::-1])[::-1]
  return 1 + int(np.sum(tails[1:] > delta * delta))


def tr_svd(x, eps, r0):
  """TR-SVD of float32 `x` at `eps` with first split `R_0 = r0`; returns ring ranks, cores."""
  n = x.ndim
  delta = eps / math.sqrt(n - 1) * float(np.linalg.norm(x))
  u, s, vt = _svd(x.reshape(x.shape[0], -1))
  r = _rank(s, delta)
  r1 = r // r0
  cores = [u[:, :r].reshape(x.shape[0], r0, r1).transpose(1, 0, 2)]
  m = np.moveaxis((s[:r, None] * vt[:r]).reshape(r0, r1, *x.shape[1:]), 0, -1)
  m = m.reshape(r1 * x.shape[1], -1)
  ranks, r_prev = [r0, r1], r1
  for k in range(1, n - 1):
    u, s, vt = _svd(m)
    rk = _rank(s, delta)
    cores.append(u[:, :rk].reshape(r_prev, x.shape[k], rk))
    ranks.append(rk)
    m = (s[:rk, None] * vt[:rk]).reshape(rk * x.shape[k + 1], -1)
    r_prev = rk
  cores.append(m.reshape(r_prev, x.shape[-1], r0))
  return tuple(ranks), cores


def rsdtr(kernel, eps):
  """Least-storage TR-SVD over the 4 shifts of the ring `(S, d_h, d_w, T)` and all splits.

  Returns `(storage, shift, cores in the ring order, ring ranks)`.
  """
  ring = np.transpose(kernel, (2, 0, 1, 3)).astype(np.float32)
  best = None
  for shift in range(4):
    order = [(shift + k) % 4 for k in range(4)]
    x = np.ascontiguousarray(np.transpose(ring, order))
    delta = eps / math.sqrt(3) * float(np.linalg.norm(x))
    r = _rank(np.linalg.svd(x.reshape(x.shape[0], -1), compute_uv=False), delta)
    for r0 in [d for d in range(1, r + 1) if r % d == 0]:
      ranks, cores = tr_svd(x, eps, r0)
      storage = sum(c.size for c in cores)
      if best is None or (storage, shift, r0) < best[:3]:
        best = (storage, shift, r0, cores, ranks)
  storage, shift, _, cores, ranks = best
  canon = [cores[(m - shift) % 4] for m in range(4)]
  return storage, shift, canon, tuple(ranks[(m - shift) % 4] for m in range(4))


def tr_to_kernel(cores):
  x = cores[0]
  for g in cores[1:]:
    x = np.tensordot(x, g, axes=1)
  ring = np.trace(x, axis1=0, axis2=-1)
  return np.transpose(ring, (1, 2, 0, 3))
