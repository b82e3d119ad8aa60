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
split), batched over all kernels of one shape with `vmap`; every split then runs the
rest of the sweep in one batched call per static pad size (`decomp.train_ring._tr_rest`),
with the split's ranks traced. Only ranks travel to the host.
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
from decomp._linalg import tail_rank
from decomp.factors import TR, num_params, reconstruct
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
    candidates: `((shift, r0, r1), storage)` for every candidate searched; `r0 r1` is the
      split of the first rank of that shift's sweep.
  """

  tr: TR
  shift: int
  ranks: tuple
  candidates: tuple

  def num_params(self) -> int:
    return num_params(self.tr)

  @property
  def storage(self) -> dict:
    return dict(self.candidates)


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
  return u, rest, jax.vmap(tail_rank)(s, delta)


@functools.partial(jax.jit, static_argnames=("p0", "p1", "method"))
def _rest_many(u, rest, idx, r0, r1, delta, p0, p1, method):
  fn = functools.partial(_tr_rest, p0=p0, p1=p1, method=method)
  return jax.vmap(fn)(u[idx], rest[idx], r0, r1, delta[idx])


def rsdtr_stack(kernels, *, eps: float, method: str = "gram") -> list:
  """RSDTR of a stack of same-shape kernels `(B, d_h, d_w, S, T)`: one `RSDTR` each."""
  kernels = _checks.as_float_array(kernels, "kernels", ndim=5)
  eps = _checks.check_eps(eps)
  method = _checks.check_method(method)
  rings = jnp.transpose(kernels, (0, *(1 + a for a in RING_AXES)))
  ring_shape = rings.shape[1:]
  norms = jnp.linalg.norm(rings.reshape(rings.shape[0], -1), axis=1)
  delta = (eps / math.sqrt(3)) * norms

  firsts = [_first_many(rings, delta, shift, method) for shift in range(4)]
  first_ranks = jax.device_get([f[2] for f in firsts])

  # Every (kernel, shift, split), grouped by the static pads it compiles for.
  groups: dict = {}
  for shift in range(4):
    for b, r in enumerate(first_ranks[shift]):
      for r0, r1 in divisor_pairs(int(r)):
        groups.setdefault((shift, _pad(r0), _pad(r1)), []).append((b, r0, r1))
  outputs = {}
  for (shift, p0, p1), items in groups.items():
    u, rest, _ = firsts[shift]
    idx, r0, r1 = (np.asarray(c, np.int32) for c in zip(*items, strict=True))
    outputs[shift, p0, p1] = _rest_many(u, rest, idx, r0, r1, delta, p0=p0, p1=p1, method=method)
  found = jax.device_get({k: v[1] for k, v in outputs.items()})

  best: dict = {}
  candidates: dict = {b: [] for b in range(rings.shape[0])}
  for key, items in groups.items():
    shift = key[0]
    dims = tuple(ring_shape[(shift + k) % 4] for k in range(4))
    for j, (b, r0, r1) in enumerate(items):
      ranks = (r0, r1, *(int(v) for v in found[key][j]))
      storage = tr_storage(dims, ranks)
      candidates[b].append(((shift, r0, r1), storage))
      order = (storage, shift, r0)
      if b not in best or order < best[b][0]:
        best[b] = (order, key, j, ranks)

  results = []
  for b in range(rings.shape[0]):
    (_, shift, _), key, j, ranks = best[b]
    padded = outputs[key][0]
    shifted = [padded[k][j, : ranks[k], :, : ranks[(k + 1) % 4]] for k in range(4)]
    # Core k of the shifted sweep belongs to ring mode (shift + k) % 4.
    cores = tuple(shifted[(m - shift) % 4] for m in range(4))
    ring_ranks = tuple(ranks[(m - shift) % 4] for m in range(4))
    results.append(RSDTR(TR(cores), shift, ring_ranks, tuple(sorted(candidates[b]))))
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
