"""RSDTR: reduced-storage direct tensor ring decomposition of conv kernels.

Gabor & Zdunek, "Reduced storage direct tensor ring decomposition for convolutional
neural networks compression". The kernel, written `T x S x d_h x d_w` in the paper,
is a ring over `T - S - d_h - d_w - T`; read from `S`, the ring is `(S, d_h, d_w, T)`,
which is the order the conv pipeline runs in: 1x1 `S -> R`, `d_h x 1`, `1 x d_w`, and
1x1 to `T` closing the ring. TR-SVD at relative error `eps` starts its sweep at
one mode of the ring; the four circular shifts give four different decompositions
(and, for each, one per split `R_0 R_1` of the first rank). RSDTR keeps the one that
stores the fewest numbers.

Our reading, tested in `tests/test_rsdtr.py`: for every shift and every divisor pair of
the first rank, run TR-SVD at `eps`, and keep the least storage; ties go to the lowest
shift, then the smallest `R_0`. This is exactly the paper's search space, so the
storage found is the paper's (up to rounding at a rank boundary).

How it is fast: the first truncation of each shift is done once per kernel (not once per
split), batched over all kernels of one shape with `vmap`; a lower bound on each
candidate's storage (from eps-ranks of the kernel's unfoldings) skips the candidates
that cannot win; the others run the rest of the sweep in one batched call per static
pad size (`decomp.train_ring._tr_rest`), with the split's ranks traced. Only ranks and
spectra travel to the host.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from decomp import _checks
from decomp._linalg import mm, tail_rank
from decomp.factors import TR, num_params, reconstruct
from decomp.ranks import _eps_rank
from decomp.train_ring import _tr_first, _tr_rest, divisor_pairs

RING_AXES = (2, 0, 1, 3)  # kernel (d_h, d_w, S, T) -> ring (S, d_h, d_w, T)
KERNEL_AXES = (1, 2, 0, 3)  # ring (S, d_h, d_w, T) -> kernel (d_h, d_w, S, T)


@functools.partial(
  jax.tree_util.register_dataclass, data_fields=["tr"], meta_fields=["shift", "ranks", "candidates"]
)
@dataclasses.dataclass(frozen=True)
class RSDTR:
  """The result of the RSDTR search for one kernel.

  Attributes:
    tr: `TR` with cores in the ring order `(S, d_h, d_w, T)` whichever shift won:
      `(R_0, S, R_1)`, `(R_1, d_h, R_2)`, `(R_2, d_w, R_3)`, `(R_3, T, R_0)`.
    shift: the winning shift `s`: the sweep started at ring mode `s` (0: S, 1: d_h, ...).
    ranks: `(R_0, R_1, R_2, R_3)` of `tr`.
    candidates: `((shift, r0, r1), storage, lower_bound)` for every candidate of the
      search; `r0 r1` is the split of the first rank of that shift's sweep. `storage` is
      None for a candidate whose lower bound exceeded a storage already found (it
      cannot win, so it was not evaluated).
  """

  tr: TR
  shift: int
  ranks: tuple
  candidates: tuple

  def num_params(self) -> int:
    return num_params(self.tr)

  @property
  def storage(self) -> dict:
    """`{(shift, r0, r1): storage}` of the candidates evaluated."""
    return {c: s for c, s, _ in self.candidates if s is not None}


@reconstruct.register
def _(f: RSDTR) -> jax.Array:
  """The kernel `(d_h, d_w, S, T)`."""
  return jnp.transpose(reconstruct(f.tr), KERNEL_AXES)


def tr_storage(shape, ranks) -> int:
  """Numbers stored by TR cores of ring `ranks` over modes `shape`: `sum_k R_{k-1} I_k R_k`."""
  n = len(shape)
  return sum(ranks[k] * shape[k] * ranks[(k + 1) % n] for k in range(n))


def _pad(n: int) -> int:
  """Smallest of 1, 2, 3, 4, 6, 8, 12, ... (2^k and 3 * 2^k) that is >= n.

  Splits share a compilation when their ranks pad to the same sizes; this grid keeps
  the padding under 50% per rank and the number of compilations logarithmic.
  """
  p = 1
  while True:
    if p >= n:
      return p
    if p >= 2 and 3 * p // 2 >= n:
      return 3 * p // 2
    p *= 2


def _shift_axes(shift: int) -> tuple:
  return (0, *(1 + (shift + k) % 4 for k in range(4)))


@functools.partial(jax.jit, static_argnames=("shift", "method"))
def _first_many(rings, delta, shift, method):
  x = jnp.transpose(rings, _shift_axes(shift))
  u, s, rest = jax.vmap(lambda y: _tr_first(y, method))(x)
  return u, rest, jax.vmap(tail_rank)(s, delta), s


@jax.jit
def _pair_spectra(rings):
  """Singular values of the two 2|2 unfoldings of the ring, `(S d_h | d_w T)` and
  `(d_h d_w | T S)`, from `eigvalsh` of the smaller Gram matrix."""

  def spectrum(m):
    g = mm(m, m.T) if m.shape[0] <= m.shape[1] else mm(m.T, m)
    return jnp.sqrt(jnp.maximum(jnp.linalg.eigvalsh(g)[::-1], 0))

  b, s, dh, dw, t = rings.shape
  a = rings.reshape(b, s * dh, dw * t)
  c = jnp.transpose(rings, (0, 2, 3, 4, 1)).reshape(b, dh * dw, t * s)
  return jax.vmap(spectrum)(a), jax.vmap(spectrum)(c)


@functools.partial(jax.jit, static_argnames=("p0", "p1", "method"))
def _rest_many(u, rest, idx, r0, r1, delta, p0, p1, method):
  fn = functools.partial(_tr_rest, p0=p0, p1=p1, method=method)
  return jax.vmap(fn)(u[idx], rest[idx], r0, r1, delta[idx])


def _lower_bound(dims, r0, r1, rho, pi_next, pi_after) -> int:
  """A lower bound on the storage of the TR-SVD candidate `(r0, r1)` of one shift.

  The candidate approximates `x` within `eps`, so each unfolding of its ring has at least
  the eps-rank of that unfolding of `x` (Eckart-Young), and a ring bounds unfolding ranks
  by products of its ranks: mode `k+1` alone by `R_1 R_2`, mode `k+3` by `R_3 R_0`, the
  mode pair `(k, k+1)` by `R_0 R_2`, the pair `(k+1, k+2)` by `R_1 R_3`. So
  `R_2 >= max(rho_1 / R_1, pi_01 / R_0)` and `R_3 >= max(rho_3 / R_0, pi_12 / R_1)`.
  """
  r2 = max(1, -(-rho[1] // r1), -(-pi_next // r0))
  r3 = max(1, -(-rho[3] // r0), -(-pi_after // r1))
  return tr_storage(dims, (r0, r1, r2, r3))


def rsdtr_stack(kernels, *, eps: float, method: str = "gram") -> list:
  """RSDTR of a stack of same-shape kernels `(B, d_h, d_w, S, T)`: one `RSDTR` each.

  The search is exact but does not evaluate every candidate: each candidate's storage
  has a lower bound from the eps-ranks of the kernel's unfoldings (`_lower_bound`);
  after one round that evaluates each kernel's most promising candidate, only the
  candidates whose bound does not exceed the best storage found are evaluated. The
  result is the exhaustive search's (tested against a brute-force search).
  """
  kernels = _checks.as_float_array(kernels, "kernels", ndim=5)
  eps = _checks.check_eps(eps)
  method = _checks.check_method(method)
  rings = jnp.transpose(kernels, (0, *(1 + a for a in RING_AXES)))
  ring_shape = rings.shape[1:]
  norms = jnp.linalg.norm(rings.reshape(rings.shape[0], -1), axis=1)
  delta = (eps / math.sqrt(3)) * norms
  n_kernels = rings.shape[0]

  firsts = [_first_many(rings, delta, shift, method) for shift in range(4)]
  host = jax.device_get(
    ([f[2] for f in firsts], [f[3] for f in firsts], _pair_spectra(rings), norms)
  )
  first_ranks, mode_spectra, (spec_a, spec_b), norms_h = host
  # eps-ranks of x's unfoldings at the whole error budget, with a hair of slack so that
  # float rounding of a candidate's error can never make a bound invalid (they are at
  # least 1, which every ring rank is too).
  bound = [eps * (1 + 1e-3) * float(n) for n in norms_h]
  rho = [
    [_eps_rank(np.float64(mode_spectra[m][b]), bound[b]) for m in range(4)]
    for b in range(n_kernels)
  ]
  pi = [
    (_eps_rank(np.float64(spec_a[b]), bound[b]), _eps_rank(np.float64(spec_b[b]), bound[b]))
    for b in range(n_kernels)
  ]

  lower: dict = {}
  for shift in range(4):
    dims = tuple(ring_shape[(shift + k) % 4] for k in range(4))
    for b in range(n_kernels):
      rho_s = [rho[b][(shift + k) % 4] for k in range(4)]
      # Pair (shift, shift+1) is unfolding A for even shifts, B for odd ones.
      pi_next, pi_after = pi[b] if shift % 2 == 0 else pi[b][::-1]
      for r0, r1 in divisor_pairs(int(first_ranks[shift][b])):
        lower[b, shift, r0, r1] = _lower_bound(dims, r0, r1, rho_s, pi_next, pi_after)

  evaluated: dict = {}  # (b, shift, r0, r1) -> (storage, ranks, key, j)
  outputs: dict = {}

  def evaluate(cands):
    groups: dict = {}
    for b, shift, r0, r1 in cands:
      groups.setdefault((shift, _pad(r0), _pad(r1)), []).append((b, r0, r1))
    fresh = {}
    for (shift, p0, p1), items in groups.items():
      u, rest, _, _ = firsts[shift]
      idx, r0s, r1s = (np.asarray(c, np.int32) for c in zip(*items, strict=True))
      key = (len(outputs), shift)
      outputs[key] = _rest_many(u, rest, idx, r0s, r1s, delta, p0=p0, p1=p1, method=method)
      fresh[key] = items
    found = jax.device_get({k: outputs[k][1] for k in fresh})
    for key, items in fresh.items():
      shift = key[1]
      dims = tuple(ring_shape[(shift + k) % 4] for k in range(4))
      for j, (b, r0, r1) in enumerate(items):
        ranks = (r0, r1, *(int(v) for v in found[key][j]))
        evaluated[b, shift, r0, r1] = (tr_storage(dims, ranks), ranks, key, j)

  def order(c):
    return (lower[c], c[1], c[2])

  evaluate([min((c for c in lower if c[0] == b), key=order) for b in range(n_kernels)])
  best = {b: min(v[0] for c, v in evaluated.items() if c[0] == b) for b in range(n_kernels)}
  evaluate([c for c in lower if c not in evaluated and lower[c] <= best[c[0]]])

  results = []
  for b in range(n_kernels):
    mine = {c: v for c, v in evaluated.items() if c[0] == b}
    (_, shift, _, _), (_, ranks, key, j) = min(
      mine.items(), key=lambda cv: (cv[1][0], cv[0][1], cv[0][2])
    )
    padded = outputs[key][0]
    shifted = [padded[k][j, : ranks[k], :, : ranks[(k + 1) % 4]] for k in range(4)]
    # Core k of the shifted sweep belongs to ring mode (shift + k) % 4.
    cores = tuple(shifted[(m - shift) % 4] for m in range(4))
    ring_ranks = tuple(ranks[(m - shift) % 4] for m in range(4))
    cands = tuple(
      sorted(
        ((c[1], c[2], c[3]), mine[c][0] if c in mine else None, lower[c])
        for c in lower
        if c[0] == b
      )
    )
    results.append(RSDTR(TR(cores), shift, ring_ranks, cands))
  return results


def rsdtr(kernel, *, eps: float, method: str = "gram") -> RSDTR:
  """RSDTR of one conv kernel.

  Args:
    kernel: Flax conv kernel `(d_h, d_w, S, T)`.
    eps: relative error bound in (0, 1) for every candidate TR-SVD.
    method: `"gram"` or `"svd"`.

  Returns:
    `RSDTR`; `reconstruct` of it gives the kernel `(d_h, d_w, S, T)` back, and
    `rel_error(kernel, result) <= eps`.
  """
  kernel = _checks.as_kernel(kernel)
  return rsdtr_stack(kernel[None], eps=eps, method=method)[0]


def rsdtr_many(kernels: Sequence, *, eps: float, method: str = "gram") -> list:
  """RSDTR of kernels of any shapes: same-shape kernels are searched together."""
  by_shape: dict = {}
  for i, k in enumerate(kernels):
    by_shape.setdefault(tuple(k.shape), []).append(i)
  out: list = [None] * len(kernels)
  for idx in by_shape.values():
    stack = jnp.stack([_checks.as_kernel(kernels[i], f"kernels[{i}]") for i in idx])
    for i, res in zip(idx, rsdtr_stack(stack, eps=eps, method=method), strict=True):
      out[i] = res
  return out
