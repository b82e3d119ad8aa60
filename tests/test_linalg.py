"""The truncated-SVD kernels against float64 numpy: Eckart-Young errors, orthogonality."""

import jax.numpy as jnp
import numpy as np
import pytest

from decomp._linalg import eigvalsh_desc, tail_rank, truncated_svd
from tests import reference as ref

SHAPES = [(7, 30), (30, 7), (16, 16), (64, 576), (576, 64), (1, 9), (9, 1)]


@pytest.mark.parametrize("method", ["gram", "svd"])
@pytest.mark.parametrize("shape", SHAPES)
def test_truncation_error_is_eckart_young(method, shape):
  rng = np.random.default_rng(0)
  m = rng.standard_normal(shape)
  s_ref = np.linalg.svd(m, compute_uv=False)
  for k in sorted({1, min(shape) // 2 or 1, min(shape)}):
    u, s, rest = truncated_svd(jnp.asarray(m), k, method)
    u, rest = np.asarray(u), np.asarray(rest)
    err = np.linalg.norm(m - u @ rest)
    assert err == pytest.approx(ref.tails(s_ref)[k], abs=1e-10 * np.linalg.norm(m))
    np.testing.assert_allclose(u.T @ u, np.eye(k), atol=1e-12)
    np.testing.assert_allclose(np.asarray(s), s_ref, rtol=1e-6, atol=1e-7 * s_ref[0])


@pytest.mark.parametrize("method", ["gram", "svd"])
def test_float32_gram_within_one_percent_of_exact(method):
  rng = np.random.default_rng(1)
  m = rng.standard_normal((256, 2304)).astype(np.float32)
  s_ref = np.linalg.svd(m.astype(np.float64), compute_uv=False)
  for k in (16, 64, 128):
    u, _, rest = truncated_svd(jnp.asarray(m), k, method)
    err = np.linalg.norm(m.astype(np.float64) - np.asarray(u, np.float64) @ np.asarray(rest))
    assert err <= 1.01 * ref.tails(s_ref)[k]


def test_exact_low_rank_to_machine_precision():
  rng = np.random.default_rng(2)
  m = rng.standard_normal((40, 5)) @ rng.standard_normal((5, 90))
  for method in ("gram", "svd"):
    u, _, rest = truncated_svd(jnp.asarray(m), 5, method)
    assert np.linalg.norm(m - np.asarray(u) @ np.asarray(rest)) <= 1e-12 * np.linalg.norm(m)


def test_tail_rank_matches_brute_force():
  rng = np.random.default_rng(3)
  for _ in range(50):
    s = np.sort(rng.exponential(size=12))[::-1]
    delta = rng.uniform(0, np.linalg.norm(s))
    assert int(tail_rank(jnp.asarray(s), jnp.asarray(delta))) == ref.eps_rank(s, delta)


def test_gram_route_has_no_qr_in_the_cpu_lowering():
  """Concurrent batched QR custom calls deadlock XLA's CPU runtime (jaxlib 0.10.2 on 2
  cores: several `jnp.linalg.qr` in one jitted graph, run a few hundred times, never
  return). The gram route lowered for the CPU must not call QR, for either orientation;
  lowered for cuda and tpu, the tall orientation runs the plain QR (the polar step is a
  CPU-only choice)."""
  import jax

  for shape in [(64, 576), (576, 64)]:
    fn = jax.jit(jax.vmap(lambda m: truncated_svd(m, 8, "gram")))
    x = jnp.zeros((3, *shape), jnp.float32)
    hlo = fn.lower(x).as_text().lower()
    assert "geqrf" not in hlo and "householder" not in hlo
    accel = jax.export.export(fn, platforms=("cuda", "tpu"))(x).mlir_module().lower()
    assert ("geqrf" in accel or "householder" in accel) == (shape[0] > shape[1]), shape


@pytest.mark.parametrize("shape", [(40, 6), (300, 12)])
def test_the_polar_step_and_qr_give_the_same_columns(shape):
  """The two routes of `_orthonormal_columns` (CPU: polar; cuda/tpu: QR), both run here:
  the same orthonormal columns along `b / s`, and a zero-energy column zero in both."""
  from decomp import _linalg

  rng = np.random.default_rng(3)
  m = rng.standard_normal(shape) @ np.diag(np.geomspace(1, 1e-3, shape[1]))
  m[:, -1] = 0  # rank-deficient: the last singular value is 0
  u, s, vt = np.linalg.svd(m, full_matrices=False)
  b = jnp.asarray(m @ vt.T)
  polar = np.asarray(_linalg._polar_columns(b, jnp.asarray(s)))
  qr = np.asarray(_linalg._qr_columns(b, jnp.asarray(s)))
  np.testing.assert_allclose(qr, polar, atol=1e-9)
  np.testing.assert_allclose(polar[:, :-1], u[:, :-1], atol=1e-7)
  assert not polar[:, -1].any() and not qr[:, -1].any()


def test_eigvalsh_desc_falls_back_without_the_private_lapack_entry_point(monkeypatch):
  """`jaxlib.lapack.prepare_lapack_call` is private: without it, the public eigvalsh."""
  from decomp import _linalg

  g = np.random.default_rng(4).standard_normal((5, 9, 9))
  g = g @ np.swapaxes(g, -1, -2)
  want = np.linalg.eigvalsh(g)[..., ::-1]
  monkeypatch.setattr(_linalg, "_syevd_target", lambda dtype: None)
  np.testing.assert_allclose(eigvalsh_desc(jnp.asarray(g)), want, rtol=1e-10, atol=1e-10)
  monkeypatch.undo()
  assert _linalg._syevd_target(jnp.float64) is not None  # the tested jaxlib has it
  np.testing.assert_allclose(eigvalsh_desc(jnp.asarray(g)), want, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [1, 5, 64, 192])
def test_eigvalsh_desc_matches_numpy(dtype, n):
  """Descending eigenvalues, batched and vmapped, of full-rank and rank-deficient Grams,
  each within 256 ulps of the largest (the allowance `decomp.rsdtr` bounds with; LAPACK's
  QR iteration was measured at <= 60 in float32 at n = 192, divide and conquer at 3)."""
  import jax

  rng = np.random.default_rng(n)
  m = rng.standard_normal((3, n, n + 7))
  m[1, :, n // 2 + 1 :] = 0  # rank n // 2 + 1: the rest are zero eigenvalues
  g = (m @ m.transpose(0, 2, 1)).astype(dtype)
  want = np.linalg.eigvalsh(np.float64(g))[:, ::-1]
  tol = 256 * np.finfo(dtype).eps * want[:, :1]
  for got in (eigvalsh_desc(jnp.asarray(g)), jax.jit(jax.vmap(eigvalsh_desc))(jnp.asarray(g))):
    assert got.dtype == dtype
    assert np.all(np.abs(np.asarray(got, np.float64) - want) <= tol)


def test_eigvalsh_desc_computes_no_eigenvectors_on_cpu():
  """The CPU lowering is LAPACK syevd with jobz = 'N' (78), not eigh's 'V' (86)."""
  import jax

  if jax.default_backend() != "cpu":
    pytest.skip("the jobz='N' kernel is the CPU lowering")
  hlo = jax.jit(eigvalsh_desc).lower(jnp.zeros((2, 6, 6), jnp.float32)).as_text()
  assert "lapack_ssyevd_ffi" in hlo and "mode = 78" in hlo and "mode = 86" not in hlo


def test_eigvalsh_desc_nan_in_nan_out():
  g = np.eye(4)
  g[1, 2] = g[2, 1] = np.nan
  assert np.isnan(np.asarray(eigvalsh_desc(jnp.asarray(g)))).any()


def test_eigvalsh_desc_lowers_to_the_gpu_solver_for_gpus():
  """Lowered for CUDA (cross-platform export, no GPU needed), the CPU LAPACK kernel is
  not in the program: `platform_dependent` picks the branch at lowering time."""
  import re

  import jax
  from jax import export

  x = jax.ShapeDtypeStruct((3, 6, 6), jnp.float32)
  calls = {}
  for platform in ("cuda", "cpu"):
    text = export.export(jax.jit(eigvalsh_desc), platforms=(platform,))(x).mlir_module()
    calls[platform] = set(re.findall(r"custom_call @(\w+)", text))
  assert calls == {"cuda": {"cusolver_syevd_ffi"}, "cpu": {"lapack_ssyevd_ffi"}}


def _lapack_operand_ranks(module_text: str) -> list[int]:
  """The rank of the first operand of every jaxlib LAPACK custom call in a module."""
  import re

  calls = re.findall(r"custom_call\s*@(lapack_\w+)\(.*?:\s*\(tensor<([^>]*)>", module_text)
  return [len(shape.split("x")) - 1 for _, shape in calls]


def test_every_solver_takes_one_matrix_per_lapack_call_in_the_cpu_lowering():
  """jaxlib 0.10.2's batched LAPACK kernels split a batch over XLA's thread pool from a pool
  thread and can wait forever (`benchmarks/repro_cpu_hang.py`). Lowered for the CPU, every
  solver of `decomp._linalg` calls LAPACK on one matrix at a time, whether the batch is
  explicit or from `vmap` (nested too), and gives what a call per matrix gives; exported for
  cuda and tpu, the batched solver runs as jax lowers it, with no loop around it."""
  import jax

  from decomp import _linalg

  sym = jnp.eye(6, dtype=jnp.float32) * 2 + 0.1
  tri = jnp.tril(sym)
  cases = {
    "eigh": (_linalg.eigh, (sym,)),
    "eigvalsh": (_linalg._eigvalsh, (sym,)),
    "svd": (_linalg.svd, (sym[:, :4],)),
    "svdvals": (_linalg.svdvals, (sym[:, :4],)),
    "qr": (_linalg.qr, (sym[:, :4],)),
    "cholesky": (_linalg.cholesky, (sym,)),
    "solve_lower": (_linalg.solve_lower, (tri, sym[:, :3])),
    "pinv": (_linalg.pinv_hermitian, (sym,)),
  }
  for name, (fn, args) in cases.items():
    stack = [jnp.stack([a] * 3) for a in args]
    nested = [jnp.stack([a] * 2) for a in stack]
    for f, xs in [
      (fn, stack),  # explicit batch
      (jax.vmap(fn), stack),
      (jax.vmap(jax.vmap(fn)), nested),
      (jax.vmap(fn, in_axes=(0,) + (None,) * (len(args) - 1)), [stack[0], *args[1:]]),
    ]:
      cpu = jax.jit(f).lower(*xs).as_text()
      ranks = _lapack_operand_ranks(cpu)
      assert ranks and set(ranks) == {2}, (name, ranks)
      want = jax.vmap(fn)(*stack) if f is fn else None
      if want is not None:  # the loop gives what one call per matrix gives
        for got_leaf, one_leaf in zip(
          jax.tree.leaves(jax.jit(f)(*xs)), jax.tree.leaves(fn(*args)), strict=True
        ):
          np.testing.assert_allclose(got_leaf[1], one_leaf, rtol=1e-6, atol=1e-6)

    def loops(f, stack=stack):
      module = jax.export.export(jax.jit(jax.vmap(f)), platforms=("cuda", "tpu"))(*stack)
      return module.mlir_module().count("stablehlo.while")

    assert loops(fn) == loops(fn.__wrapped__), name  # no loop of ours around the solver
