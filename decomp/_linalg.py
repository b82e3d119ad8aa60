"""Truncated SVD kernels used by every decomposition.

Two routes to the leading singular subspace of a matrix `m` of shape `(a, b)`:

- `"svd"`: `jnp.linalg.svd`; the exact reference.
- `"gram"`: `eigh` of the smaller Gram matrix (`m m^T` if `a <= b`, else `m^T m`).
  Squaring the matrix loses the singular values below about `sqrt(machine eps)` of
  the largest, but not the truncation error: the error of a rank-`k` projection is
  stationary in the subspace, so subspace errors enter it only to second order. For
  the tall case the right vectors `V_k` come from `eigh` and the left factor is
  `m V_k / s_k` made orthonormal by one polar step (`_orthonormal_columns`).

Both return `u` (orthonormal columns), the singular values and `rest = u^T m`, so that
`u @ rest` is the rank-`k` approximation.

Signs are canonical: each column of `u` has its largest-magnitude entry positive (the
rule of sklearn's `svd_flip`, which TensorLy applies too). Truncation errors do not
depend on signs, but TR-SVD does: it splits the first left factor's columns into
`R_0 x R_1`, and a sign flip of single columns is not a Kronecker-structured change,
so later unfoldings, their ranks and the final error change with it. One convention
makes both routes, every backend and the references agree. Matrix products run at HIGHEST precision:
on GPUs the default float32 matmul is TF32, whose 1e-3 relative error would swamp
the truncation error being measured.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

HIGHEST = jax.lax.Precision.HIGHEST


def one_matrix_at_a_time(fn=None, *, core_ndims=(2,)):
  """`fn` (LAPACK-backed, on arguments of `core_ndims` dimensions each) made to solve one
  problem per LAPACK call where it is lowered for the CPU; unchanged elsewhere.

  Why: jaxlib's CPU LAPACK kernels (0.10.2) split a batched call (`syevd`, `potrf`, `gesdd`,
  ...) over XLA's intra-op thread pool and wait for the pieces on the worker that runs the
  call (`jax::ParallelBatchMap`, a `BlockingCounter` on a pool thread: seen with gdb in
  every hung process). With two such calls in flight the pieces are never run, and the
  program never returns (`python -m benchmarks.repro_cpu_hang`: the ResNet-50 Tucker-2
  distortion hung in its first run, 2026-12-07). A call on one matrix runs inline, so
  a batch, whether explicit (leading dimensions) or from `jax.vmap`, is looped with
  `lax.map` on the CPU lowering (`lax.platform_dependent`): no pool re-entry, no
  process-wide setting. On GPU/TPU the batched solver runs as before. The batched rule is
  a `jax.custom_batching.custom_vmap`, so this holds under any user `vmap` too; such a
  function is not differentiable (none of our solver calls is differentiated).
  """
  if fn is None:
    return functools.partial(one_matrix_at_a_time, core_ndims=core_ndims)

  def batched(*xs):  # every x with one leading batch axis
    if jax.default_backend() != "cpu":  # the CPU branch is not even traced (see below)
      return jax.vmap(fn)(*xs)
    return jax.lax.platform_dependent(
      *xs, cpu=lambda *a: jax.lax.map(lambda b: wrapped(*b), a), default=jax.vmap(fn)
    )

  @jax.custom_batching.custom_vmap
  def wrapped(*xs):
    extra = [x.ndim - c for x, c in zip(xs, core_ndims, strict=True)]
    if max(extra) == 0:
      return fn(*xs)
    lead = next(x.shape[:e] for x, e in zip(xs, extra, strict=True) if e == max(extra))
    flat = [
      jnp.broadcast_to(x, (*lead, *x.shape[e:])).reshape(-1, *x.shape[e:])
      for x, e in zip(xs, extra, strict=True)
    ]
    out = batched(*flat)
    return jax.tree.map(lambda o: o.reshape(*lead, *o.shape[1:]), out)

  @wrapped.def_vmap
  def _rule(axis_size, in_batched, *xs):
    xs = [
      x if b else jnp.broadcast_to(x, (axis_size, *x.shape))
      for x, b in zip(xs, in_batched, strict=True)
    ]
    out = batched(*xs)
    return out, jax.tree.map(lambda _: True, out)

  return functools.wraps(fn)(wrapped)


eigh = one_matrix_at_a_time(jnp.linalg.eigh)
qr = one_matrix_at_a_time(jnp.linalg.qr)
cholesky = one_matrix_at_a_time(jnp.linalg.cholesky)
svd = one_matrix_at_a_time(functools.partial(jnp.linalg.svd, full_matrices=False))
svdvals = one_matrix_at_a_time(functools.partial(jnp.linalg.svd, compute_uv=False))
pinv_hermitian = one_matrix_at_a_time(functools.partial(jnp.linalg.pinv, hermitian=True))
solve_lower = one_matrix_at_a_time(
  functools.partial(jax.scipy.linalg.solve_triangular, lower=True), core_ndims=(2, 2)
)


def mm(a, b):
  return jnp.matmul(a, b, precision=HIGHEST)


def eigh_desc(g: jax.Array):
  """Eigenvalues (descending) and eigenvectors (columns, same order) of symmetric `g`."""
  lam, v = eigh(g)
  return lam[..., ::-1], v[..., ::-1]


def eigvalsh_desc(g: jax.Array) -> jax.Array:
  """Eigenvalues (descending) of symmetric `g` `(..., n, n)`, without eigenvectors.

  `jnp.linalg.eigvalsh` computes the eigenvectors and drops them (its CPU lowering always
  calls LAPACK `syevd` with `jobz='V'`). On CPU this calls the same `syevd` kernel of
  jaxlib with `jobz='N'`: tridiagonal reduction and the QR/dqds eigenvalue iteration
  only, which skips the eigenvector work `eigvalsh` does and drops. Its eigenvalues are
  less accurate than divide and conquer's (float32, n = 192: within 60 ulps of the
  largest against 3), which is ample for eps-ranks.
  Other platforms use `jnp.linalg.eigvalsh`. The choice is made when lowering
  (`lax.platform_dependent`), so the CPU kernel is never lowered for a GPU. Where the
  default backend is not the CPU (a GPU machine), the CPU branch is not even traced:
  tracing it touches jaxlib's LAPACK registration, which that machine's programs do not
  need (a program placed on its CPU then uses `jnp.linalg.eigvalsh` there too).
  """
  return _eigvalsh(g)[..., ::-1]


@one_matrix_at_a_time
def _eigvalsh(g: jax.Array) -> jax.Array:
  if jax.default_backend() != "cpu":
    return jnp.linalg.eigvalsh(g)
  return jax.lax.platform_dependent(g, cpu=_lapack_eigvalsh, default=jnp.linalg.eigvalsh)


def _syevd_target(dtype) -> str | None:
  """The FFI target name of jaxlib's LAPACK `syevd` for `dtype`, or None where this jaxlib
  does not expose it as `jaxlib.lapack.prepare_lapack_call` (a private API: guarded)."""
  try:
    from jaxlib import lapack  # jaxlib's own registration of its CPU LAPACK kernels

    return lapack.prepare_lapack_call("syevd_ffi", dtype)
  except (ImportError, AttributeError, TypeError, ValueError):
    return None


def _lapack_eigvalsh(g: jax.Array) -> jax.Array:
  """Ascending eigenvalues from jaxlib's LAPACK `syevd` FFI kernel with `jobz='N'`.

  The kernel reads the lower triangle of each (column-major) matrix; `g` is symmetric,
  so the layout does not matter. It overwrites its input, which is aliased and dropped,
  and returns LAPACK's `info` per matrix; a failed solve gives NaN, as `jnp.linalg.eigh`
  does. Without the private entry point (`_syevd_target`), `jnp.linalg.eigvalsh`.
  """
  target = _syevd_target(g.dtype)
  if target is None:  # this jaxlib has no such private entry point: the public route
    return jnp.linalg.eigvalsh(g)
  g = (g + jnp.swapaxes(g, -1, -2)) / 2  # what eigh's symmetrize_input does
  call = jax.ffi.ffi_call(
    target,
    (
      jax.ShapeDtypeStruct(g.shape, g.dtype),
      jax.ShapeDtypeStruct(g.shape[:-1], g.dtype),
      jax.ShapeDtypeStruct(g.shape[:-2], jnp.int32),
    ),
    input_output_aliases={0: 0},
    vmap_method="broadcast_all",
  )
  _, w, info = call(g, mode=np.uint8(ord("N")), uplo=np.uint8(ord("L")))
  return jnp.where((info == 0)[..., None], w, jnp.nan)


def _canonical_signs(u: jax.Array, rest: jax.Array):
  pivot = jnp.take_along_axis(u, jnp.argmax(jnp.abs(u), axis=0)[None, :], axis=0)
  sign = jnp.where(pivot < 0, -1, 1).astype(u.dtype)
  return u * sign, rest * sign.reshape(-1, 1)


def truncated_svd(m: jax.Array, k: int, method: str):
  u, s, rest = _truncated_svd(m, k, method)
  u, rest = _canonical_signs(u, rest)
  return u, s, rest


def _truncated_svd(m: jax.Array, k: int, method: str):
  """Rank-`k` truncated SVD of `m` `(a, b)`.

  Returns:
    `(u, s, rest)`: `u` `(a, k)` with orthonormal columns, `s` `(min(a, b),)` all
    singular values in descending order (for tail norms), `rest` `(k, b) = u^T m`.
  """
  a, b = m.shape
  if method == "svd":
    u, s, vt = svd(m)
    return u[:, :k], s, s[:k, None] * vt[:k]
  if method != "gram":
    raise ValueError(f"method must be 'gram' or 'svd', got {method!r}.")
  if a <= b:
    lam, w = eigh_desc(mm(m, m.T))
    u = w[:, :k]
    return u, jnp.sqrt(jnp.maximum(lam, 0)), mm(u.T, m)
  lam, v = eigh_desc(mm(m.T, m))
  s = jnp.sqrt(jnp.maximum(lam, 0))
  u = _orthonormal_columns(mm(m, v[:, :k]), s[:k])
  return u, s, mm(u.T, m)


def _orthonormal_columns(b: jax.Array, s: jax.Array) -> jax.Array:
  """Orthonormal columns spanning `b = m V_k`, whose columns have norms `s` (descending).

  `b / s` is the SVD's left factor; its orthogonality degrades like `eps (s_1 / s_i)^2`.
  Where the program is lowered for the CPU, one polar step `u (u^T u)^{-1/2}` (eigh of a
  `k x k` matrix) restores it (`_polar_columns`): concurrent batched QR calls deadlock
  XLA's CPU runtime (jaxlib 0.10.2, seen on 2 cores; `benchmarks/repro_cpu_hang.py`), and
  `test_gram_route_has_no_qr_in_the_cpu_lowering` keeps QR out of it. Elsewhere (cuda,
  tpu) the plain Householder QR of `b / s` runs (`_qr_columns`). Both leave a column
  with `s_i` at rounding level (no energy) zero, and agree to rounding on the rest.
  """
  return jax.lax.platform_dependent(b, s, cpu=_polar_columns, default=_qr_columns)


def _unit_columns(b, s):
  tiny = s[0] * jnp.finfo(b.dtype).eps * max(b.shape)
  keep = s > tiny
  return b * jnp.where(keep, 1 / jnp.where(keep, s, 1), 0)[None, :], keep


def _polar_columns(b: jax.Array, s: jax.Array) -> jax.Array:
  u, _ = _unit_columns(b, s)
  mu, w = eigh(mm(u.T, u))
  inv_sqrt = jnp.where(mu > 0.5, 1 / jnp.sqrt(jnp.where(mu > 0.5, mu, 1)), 0)
  return mm(u, mm(w * inv_sqrt[None, :], w.T))


def _qr_columns(b: jax.Array, s: jax.Array) -> jax.Array:
  u, keep = _unit_columns(b, s)
  q, r = qr(u)
  sign = jnp.where(jnp.diagonal(r) < 0, -1, 1).astype(u.dtype)  # columns along u's
  return q * (sign * keep.astype(u.dtype))[None, :]


def tail_rank(s: jax.Array, delta: jax.Array) -> jax.Array:
  """Smallest `r >= 1` with `sqrt(sum_{i >= r} s_i^2) <= delta` (traceable).

  `s` is descending; tails are summed from the small end, which keeps them accurate
  when they are tiny compared with the norm.
  """
  sq = s * s
  tails = jnp.cumsum(sq[::-1])[::-1]  # tails[r] = sum_{i >= r} s_i^2
  return 1 + jnp.sum(tails[1:] > delta * delta).astype(jnp.int32)


def mask_columns(u: jax.Array, rest: jax.Array, r: jax.Array):
  """Zeroes the columns `>= r` of `u` and the matching rows of `rest`."""
  keep = jnp.arange(u.shape[1], dtype=jnp.int32) < r
  return u * keep[None, :].astype(u.dtype), rest * keep[:, None].astype(rest.dtype)


def cholesky_qr(a: jax.Array) -> jax.Array:
  """Orthonormal columns spanning `a` `(m, k)`, `k <= m`: shifted Cholesky-QR, twice.

  `r^T r = a^T a + shift I` and `a r^{-1}`, done twice (Fukaya et al. 2020: the first pass
  conditions, the second restores orthogonality to rounding level). The shift (a few
  hundred ulps of the Gram trace) keeps Cholesky defined for rank-deficient or zero `a`,
  whose deficient columns come out small instead of NaN. Matrix products and one small
  Cholesky per pass: no QR (see `_orthonormal_columns`)."""
  eps = jnp.finfo(a.dtype).eps
  k = a.shape[1]
  for _ in range(2):
    g = mm(a.T, a)
    shift = 100 * eps * jnp.trace(g) + jnp.finfo(a.dtype).tiny
    r = cholesky(g + shift * jnp.eye(k, dtype=a.dtype))
    a = solve_lower(r, a.T).T
  return a
