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

How it is fast (ResNet-32 at eps 0.3 on a 2-core CPU: 31 kernels, 343 candidates, the
paper's loop runs each from scratch): the first truncation of each shift is done once
per kernel, not once per split, batched over the kernels of one shape; a lower bound on
each candidate's storage (`_lower_bound`, from eps-ranks of the kernel's unfoldings at
the error the sweep has left) skips the candidates that cannot win; the others are
evaluated for their ranks only (``_tr_rest_ranks` below`: no orthonormal
factors, no cores), all of a shape in one call per round, grouped by static pad sizes
with the split traced; only the winners' cores are computed. Four transfers to the host
in all, of ranks and spectra, and of the winners' cores.

A first search compiles dozens of programs (one per kernel shape and round), so compile
time matters as much as run time: each new program is lowered on the calling thread and
compiled on a pool, one per core (`_executables`), and on CPU with XLA's classic fusion
emitters (`decomp._xla_cpu.FAST_COMPILE`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np

from decomp import _blas, _checks, _xla_cpu
from decomp._linalg import eigh_desc, eigvalsh_desc, mm, svd, svdvals, tail_rank
from decomp.factors import TR, num_params, reconstruct, scaled
from decomp.tt_tr import capped_rank, divisor_pairs, split_first_rank, tr_first, tr_rest

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


def _tr_rest_ranks(u, rest, r0, r1, delta, p0: int, p1: int, method: str):
  """The ranks `(R_2, ..., R_{N-1})` that `tr_rest` finds, without its cores.

  What a search needs from a candidate. A rank depends on the spectrum of its unfolding
  only, and that spectrum does not change when the previous core's columns are rotated
  within their span (the rotation acts on the rows of the unfolding), so the sweep keeps
  no orthonormal left factors: `rest = Sigma V^T` comes straight from `eigh` of the
  column Gram matrix of a tall unfolding (no polar step), and the last unfolding needs
  its singular values only.
  """
  _, t = split_first_rank(u, rest, r0, r1, p0, p1)
  dims = t.shape[1:-1]
  m = t.reshape(p1 * dims[0], -1)
  found, r_prev = [], jnp.asarray(r1, jnp.int32)
  for k in range(len(dims) - 1):
    last = k == len(dims) - 2
    s, rest_k = _spectrum(m, method, with_rest=not last)
    cols = math.prod(dims[k + 1 :]) * jnp.asarray(r0, jnp.int32)
    r = capped_rank(s, delta, dims[k] * r_prev, cols)
    found.append(r)
    r_prev = r
    if not last:
      keep = jnp.arange(rest_k.shape[0], dtype=jnp.int32) < r
      rest_k = rest_k * keep[:, None].astype(rest_k.dtype)
      m = rest_k.reshape(rest_k.shape[0] * dims[k + 1], -1)
  return jnp.stack(found) if found else jnp.zeros((0,), jnp.int32)


def _spectrum(m: jax.Array, method: str, with_rest: bool):
  """Singular values of `m` and, if asked, `rest` `(min(a, b), b)` with `rest^T rest = m^T m`
  whose row space is `m`'s leading right singular subspace, in order."""
  a, b = m.shape
  if method == "svd":
    if not with_rest:
      return svdvals(m), None
    _, s, vt = svd(m)
    return s, s[:, None] * vt
  g = mm(m, m.T) if a <= b else mm(m.T, m)
  if not with_rest:
    return jnp.sqrt(jnp.maximum(eigvalsh_desc(g), 0)), None
  if a <= b:
    lam, w = eigh_desc(g)
    return jnp.sqrt(jnp.maximum(lam, 0)), mm(w.T, m)
  lam, v = eigh_desc(g)
  s = jnp.sqrt(jnp.maximum(lam, 0))
  return s, s[:, None] * v.T


def _pad(n: int) -> int:
  """Smallest of 1, 2, 3, 4, 6, 8, 12, 16, 24, then the multiples of 8, that is >= n.

  Splits share a compilation when their ranks pad to the same sizes. A coarse grid
  means fewer compilations but more padding; padding costs most where ranks are large
  (an unfolding `p x q` costs `min(p, q)^3`), so above 24 the grid steps by 8.
  """
  if n > 24:
    return -(-n // 8) * 8
  return next(p for p in (1, 2, 3, 4, 6, 8, 12, 16, 24) if p >= n)


def _shift_axes(shift: int) -> tuple:
  return (0, *(1 + (shift + k) % 4 for k in range(4)))


def _first_steps(kernels, eps, method):
  """Everything the search starts from, for a stack of kernels `(B, d_h, d_w, S, T)`.

  Returns `(firsts, delta, info)`: `firsts[shift] = (u, rest)`, the first TR-SVD step of
  that shift's sweep at full rank; `delta` the tail bound of each truncation; and `info`
  for the host: per shift the first eps-rank and the singular values of that mode's
  unfolding, the singular values of the two 2|2 unfoldings `(S d_h | d_w T)` and
  `(d_h d_w | T S)` (for the lower bounds), the norms, and whether each kernel is finite.
  """
  rings = jnp.transpose(kernels, (0, *(1 + a for a in RING_AXES)))
  b, s_, dh, dw, t = rings.shape
  norms = jnp.linalg.norm(rings.reshape(b, -1), axis=1)
  delta = (eps / math.sqrt(3)) * norms
  firsts, ranks, spectra = [], [], []
  for shift in range(4):
    x = jnp.transpose(rings, _shift_axes(shift))
    u, s, rest = jax.vmap(lambda y: tr_first(y, method))(x)
    firsts.append((u, rest))
    ranks.append(jax.vmap(tail_rank)(s, delta))
    spectra.append(s)

  def spectrum(m):
    return _spectrum(m, "gram", with_rest=False)[0]

  a = rings.reshape(b, s_ * dh, dw * t)
  c = jnp.transpose(rings, (0, 2, 3, 4, 1)).reshape(b, dh * dw, t * s_)
  finite = jnp.all(jnp.isfinite(kernels.reshape(b, -1)), axis=1)
  info = (ranks, spectra, jax.vmap(spectrum)(a), jax.vmap(spectrum)(c), norms, finite)
  return tuple(firsts), delta, info


def _evaluate(firsts, delta, items, groups, sizes, method, cores):
  """Candidates of one stack in one call: `items` `(3, n)` int32 holds `(idx, r0, r1)`
  (kernel index and split) of each candidate, the first `sizes[0]` of static group
  `groups[0] = (shift, p0, p1)`, and so on; each group vmapped. `cores=False`: the ranks
  `(R_2, R_3)` only (`_tr_rest_ranks`); `cores=True`: the padded cores and ranks."""
  out, start = [], 0
  for (shift, p0, p1), size in zip(groups, sizes, strict=True):
    idx, r0, r1 = items[:, start : start + size]
    start += size
    u, rest = firsts[shift]
    fn = functools.partial(tr_rest if cores else _tr_rest_ranks, p0=p0, p1=p1, method=method)
    out.append(jax.vmap(fn)(u[idx], rest[idx], r0, r1, delta[idx]))
  return out


@functools.cache
def _programs():
  """`_first_steps` and `_evaluate` jitted, with the compile options of
  `decomp._xla_cpu.search_compiler_options` (decided on first use, when jax's backend is
  known)."""
  options = _xla_cpu.search_compiler_options()
  first = jax.jit(_first_steps, static_argnames=("method",), compiler_options=options)
  evaluate = jax.jit(
    _evaluate, static_argnames=("groups", "sizes", "method", "cores"), compiler_options=options
  )
  return first, evaluate


_EXECUTABLES: dict = {}  # (program, static arguments, argument types) -> jax.stages.Compiled
_MAX_EXECUTABLES = 2048  # the oldest are dropped beyond this (a search of ResNet-32: ~25)


def _executables(jobs: list) -> list:
  """The compiled programs of `jobs` `[(program, args, static)]` (`program` one of
  `_programs()`, `args` its array arguments, `static` a dict of its static ones), each
  compiled once per process.

  A first search compiles dozens of programs, and XLA's CPU compiler keeps only part of
  a multi-core machine busy with one. So the new programs are lowered here, in order
  (tracing then reads the caller's jax configuration, which context managers set per
  thread), and each is compiled on a pool of one thread per core as soon as it is lowered
  (XLA releases the GIL while it compiles; the README gives the measured gain). The
  programs are run by the caller, one at a time on its own thread: LAPACK calls from two
  threads at once can hang XLA's CPU runtime (`python -m benchmarks.repro_cpu_hang
  --workaround --threads`).
  """
  keys = []
  for program, args, static in jobs:
    types = tuple((a.shape, a.dtype, getattr(a, "sharding", None)) for a in jax.tree.leaves(args))
    keys.append((program, tuple(sorted(static.items())), jax.tree.structure(args), types))
  new = {k: j for k, j in zip(keys, jobs, strict=True) if k not in _EXECUTABLES}
  if new:
    workers = min(len(new), os.cpu_count() or 1)
    with ThreadPoolExecutor(workers, thread_name_prefix="rsdtr-compile") as pool:
      pending = [
        (k, pool.submit(program.lower(*args, **static).compile))
        for k, (program, args, static) in new.items()
      ]
      for k, future in pending:
        _EXECUTABLES[k] = future.result()
  out = [_EXECUTABLES[k] for k in keys]
  while len(_EXECUTABLES) > _MAX_EXECUTABLES:
    del _EXECUTABLES[next(iter(_EXECUTABLES))]  # dicts keep insertion order: the oldest
  return out


def _run(jobs: list) -> list:
  """Runs `jobs` (see `_executables`) in order on this thread; returns their outputs."""
  return [exe(*args) for exe, (_, args, _) in zip(_executables(jobs), jobs, strict=True)]


def _lower_bound(dims, r0, r1, rho2, rho3) -> int:
  """A lower bound on the storage of the TR-SVD candidate `(r0, r1)` of one shift.

  `rho2 = (mode k+1, pair (k, k+1))` and `rho3 = (mode k+3, pair (k+1, k+2))`: eps-ranks
  of unfoldings of `x` (modes numbered from the shift's start `k`) at the error levels
  below. A ring bounds unfolding ranks by products of its ranks: mode `k+1` alone by
  `R_1 R_2`, mode `k+3` by `R_3 R_0`, the pair `(k, k+1)` by `R_0 R_2`, the pair
  `(k+1, k+2)` by `R_1 R_3`; and a tensor within `tau` of `x` has each unfolding's rank
  at least that unfolding's eps-rank at `tau` (Eckart-Young). After the sweep's first two
  truncations (tails `e_0`, `e_1 <= delta`, orthogonal) the partial result has ring ranks
  `R_0, R_1, R_2` and is within `sqrt(e_0^2 + delta^2)` of `x`: this bounds `R_2`. The
  final ring is within `sqrt(e_0^2 + 2 delta^2) <= eps ||x||` and bounds `R_3`. `e_0`,
  the first truncation's tail, is known before any candidate runs.
  """
  r2 = max(1, -(-rho2[0] // r1), -(-rho2[1] // r0))
  r3 = max(1, -(-rho3[0] // r0), -(-rho3[1] // r1))
  return tr_storage(dims, (r0, r1, r2, r3))


class _Stack:
  """The search state of one stack of same-shape kernels.

  Candidates are `(b, shift, r0, r1)`: kernel `b` of the stack, the sweep starting at ring
  mode `shift`, the split `r0 * r1` of its first rank.
  """

  def __init__(self, kernels, names: list, eps: float, method: str):
    self.n, self.names, self.method = kernels.shape[0], names, method
    self.dtype = kernels.dtype
    self.ring_shape = tuple(kernels.shape[1:][a] for a in RING_AXES)
    self.first_job = (
      _programs()[0],
      (kernels, jnp.asarray(eps, kernels.dtype)),
      {"method": method},
    )
    self.firsts = self.delta = self.info = None  # `_first_steps`' outputs, set by `_rounds`
    self.lower: dict = {}  # candidate -> lower bound on its storage
    self.ranks: dict = {}  # candidate -> ring ranks (R_0, .., R_3) of its sweep

  def dims(self, shift: int) -> tuple:
    return tuple(self.ring_shape[(shift + k) % 4] for k in range(4))

  def bound_all(self, info, eps: float):
    """Every candidate and its lower bound (`_lower_bound`), from the host copy of `info`."""
    first_ranks, mode_spectra, spec_a, spec_b, norms, finite = info
    bad = np.flatnonzero(~np.asarray(finite))
    if bad.size:
      raise ValueError(
        f"{self.names[bad[0]]} contains NaN or Inf; decompositions need finite input."
      )
    ulp = float(jnp.finfo(self.dtype).eps)
    delta2 = (eps / math.sqrt(3) * np.float64(norms)) ** 2  # (B,)
    # Squared tails `tails[b, r] = sum_{i >= r} s_i^2` of the singular values of the 4 mode
    # unfoldings, then of the pairs A and B, every kernel at once; and each tail's
    # allowance for the rounding of float eigenvalues: each within 256 ulps of the
    # largest (LAPACK's QR iteration, `eigvalsh_desc`, was measured at <= 60 in float32
    # at n = 192), so a tail of `n` of them within `256 n ulp s_1^2`. A bound must stay
    # valid.
    tails, slack = [], []
    for v in (*mode_spectra, spec_a, spec_b):
      sq = np.float64(v) ** 2
      tails.append(np.cumsum(sq[:, ::-1], axis=1)[:, ::-1])
      slack.append(256 * sq.shape[1] * ulp * sq[:, 0])

    def rank(k, tau2):
      """Eps-ranks `(B,)` of spectrum `k` at squared errors `tau2` `(B,)` (>= 1)."""
      return 1 + np.sum(tails[k][:, 1:] > (tau2 + slack[k])[:, None], axis=1)

    for shift in range(4):
      r = np.asarray(first_ranks[shift])
      e0 = np.append(tails[shift], np.zeros((self.n, 1)), axis=1)[np.arange(self.n), r]
      # The error levels after the second and the third truncation (see _lower_bound).
      tau2, tau3 = e0 + delta2, e0 + 2 * delta2
      # Pair (shift, shift+1) is unfolding A for even shifts, B for odd ones.
      pair_next, pair_after = (4, 5) if shift % 2 == 0 else (5, 4)
      mode_next, mode_last = (shift + 1) % 4, (shift + 3) % 4
      rho2 = np.stack([rank(mode_next, tau2), rank(pair_next, tau2)], axis=1).tolist()
      rho3 = np.stack([rank(mode_last, tau3), rank(pair_after, tau3)], axis=1).tolist()
      dims = self.dims(shift)
      for b in range(self.n):
        for r0, r1 in divisor_pairs(int(r[b])):
          self.lower[b, shift, r0, r1] = _lower_bound(dims, r0, r1, rho2[b], rho3[b])

  def storage(self, c) -> int:
    return tr_storage(self.dims(c[1]), self.ranks[c])

  def best(self, b: int):
    """Kernel `b`'s evaluated candidate of least storage (ties: lowest shift, then r0)."""
    mine = [c for c in self.ranks if c[0] == b]
    return min(mine, key=lambda c: (self.storage(c), c[1], c[2]))

  def first_round(self) -> list:
    """Each kernel's most promising candidate (least lower bound)."""
    return [
      min((c for c in self.lower if c[0] == b), key=lambda c: (self.lower[c], c[1], c[2]))
      for b in range(self.n)
    ]

  def second_round(self) -> list:
    """The candidates not evaluated whose bound does not exceed their kernel's best."""
    best = {b: self.storage(self.best(b)) for b in range(self.n)}
    return [c for c in self.lower if c not in self.ranks and self.lower[c] <= best[c[0]]]

  def job(self, cands: list, cores: bool):
    """The evaluation of `cands`: `(members, job)`, `members[g]` the candidates of group
    `g`, `job` for `_run`."""
    by: dict = {}
    for c in cands:
      by.setdefault((c[1], _pad(c[2]), _pad(c[3])), []).append(c)
    groups = tuple(sorted(by))
    members = [by[g] for g in groups]
    sizes = tuple(len(m) for m in members)
    items = np.asarray([(c[0], c[2], c[3]) for m in members for c in m], np.int32).T
    static = {"groups": groups, "sizes": sizes, "method": self.method, "cores": cores}
    return members, (_programs()[1], (self.firsts, self.delta, items), static)


def _rounds(stacks: list, eps: float) -> None:
  """Evaluates the candidates that can win: two rounds, all stacks in each."""
  for st, out in zip(stacks, _run([st.first_job for st in stacks]), strict=True):
    st.firsts, st.delta, st.info = out
  infos = jax.device_get([st.info for st in stacks])
  for st, info in zip(stacks, infos, strict=True):
    st.bound_all(info, eps)
  for pick in (_Stack.first_round, _Stack.second_round):
    calls = [(st, st.job(cands, cores=False)) for st in stacks if (cands := pick(st))]
    found = jax.device_get(_run([job for _, (_, job) in calls]))
    for (st, (members, _)), got in zip(calls, found, strict=True):
      for group, ranks in zip(members, got, strict=True):
        for c, r23 in zip(group, ranks, strict=True):
          st.ranks[c] = (c[2], c[3], *(int(v) for v in r23))


def _winners(stacks: list) -> list:
  """Each kernel's winner, its cores computed (one call per stack, one transfer)."""
  calls = []
  for st in stacks:
    wins = [st.best(b) for b in range(st.n)]
    calls.append((st, wins, st.job(wins, cores=True)))
  got = jax.device_get(_run([job for _, _, (_, job) in calls]))
  results, cores_host = [], []
  for (st, wins, (members, _)), outs in zip(calls, got, strict=True):
    where = {c: (g, j) for g, m in enumerate(members) for j, c in enumerate(m)}
    for b, c in enumerate(wins):
      g, j = where[c]
      padded, found = outs[g]
      shift = c[1]
      # The ranks the cores were computed with; a float rounding difference from the
      # rank-only evaluation at a rank boundary would show here, and the cores decide.
      ranks = (c[2], c[3], *(int(v) for v in found[j]))
      st.ranks[c] = ranks
      shifted = [padded[k][j, : ranks[k], :, : ranks[(k + 1) % 4]] for k in range(4)]
      # Core k of the shifted sweep belongs to ring mode (shift + k) % 4.
      cores_host.append(tuple(shifted[(m - shift) % 4] for m in range(4)))
      ring_ranks = tuple(ranks[(m - shift) % 4] for m in range(4))
      cands = tuple(
        sorted(
          ((d[1], d[2], d[3]), st.storage(d) if d in st.ranks else None, st.lower[d])
          for d in st.lower
          if d[0] == b
        )
      )
      results.append((shift, ring_ranks, cands))
  cores = jax.device_put(cores_host)  # one transfer back for every core
  return [RSDTR(TR(c), *r) for c, r in zip(cores, results, strict=True)]


def _search(stacks_of_kernels: list, names: list, eps: float, method: str) -> list:
  """The RSDTR search over stacks of same-shape kernels `(B, d_h, d_w, S, T)` (`names[i][b]`
  names kernel `b` of stack `i` in errors), all stacks in step: four transfers to the host
  in all (first ranks and spectra, the ranks of two rounds of candidates, the winners'
  cores)."""
  # Each kernel searched at max|k| = 1 and its cores scaled back (see `_checks.normalized`):
  # ranks depend on relative errors only, and the Gram matrices of a kernel of 1e20 overflow.
  normal, scales = [], []
  for stack, stack_names in zip(stacks_of_kernels, names, strict=True):
    k, s = _checks.normalized(stack, "kernels", batch_dims=1, names=stack_names)
    normal.append(k)
    scales.extend(np.asarray(s))
  with _blas.single_threaded_blas():  # many small LAPACK calls: see decomp._blas
    stacks = [_Stack(k, n, eps, method) for k, n in zip(normal, names, strict=True)]
    _rounds(stacks, eps)
    found = _winners(stacks)
  return [
    dataclasses.replace(r, tr=scaled(r.tr, jnp.asarray(s, r.tr.cores[-1].dtype)))
    for r, s in zip(found, scales, strict=True)
  ]


def rsdtr_stack(kernels, *, eps: float, method: str = "gram") -> list:
  """RSDTR of a stack of same-shape kernels `(B, d_h, d_w, S, T)`: one `RSDTR` each.

  The search is exact but does not evaluate every candidate: each candidate's storage
  has a lower bound from the eps-ranks of the kernel's unfoldings (`_lower_bound`);
  after one round that evaluates each kernel's most promising candidate, only the
  candidates whose bound does not exceed the best storage found are evaluated. The
  result is the exhaustive search's (tested against a brute-force search).
  """
  kernels = _checks.as_float_array(kernels, "kernels", ndim=5, check_values=False)
  eps = _checks.check_eps_floor(_checks.check_eps(eps), kernels.dtype)
  method = _checks.check_method(method)
  names = [f"kernels[{b}]" for b in range(kernels.shape[0])]
  return _search([kernels], [names], eps, method)


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
  kernel = _checks.as_kernel(kernel, check_values=False)
  eps = _checks.check_eps_floor(_checks.check_eps(eps), kernel.dtype)
  method = _checks.check_method(method)
  return _search([kernel[None]], [["kernel"]], eps, method)[0]


def rsdtr_many(kernels: Sequence, *, eps: float, method: str = "gram") -> list:
  """RSDTR of kernels of any shapes: same-shape kernels are searched together, and all
  shapes in step (the device works on one shape while the host bounds another)."""
  eps = _checks.check_eps(eps)
  method = _checks.check_method(method)
  by_shape: dict = {}
  for i, k in enumerate(kernels):
    by_shape.setdefault(tuple(k.shape), []).append(i)
  stacks = [
    jnp.stack([_checks.as_kernel(kernels[i], f"kernels[{i}]", check_values=False) for i in idx])
    for idx in by_shape.values()
  ]
  for st in stacks:
    _checks.check_eps_floor(eps, st.dtype)
  names = [[f"kernels[{i}]" for i in idx] for idx in by_shape.values()]
  out: list = [None] * len(kernels)
  found = iter(_search(stacks, names, eps, method))
  for idx in by_shape.values():
    for i in idx:
      out[i] = next(found)
  return out
