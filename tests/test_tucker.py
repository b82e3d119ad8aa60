"""HOSVD, HOOI and Tucker-2 against float64 references and TensorLy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorly as tl
from tensorly.decomposition import partial_tucker
from tensorly.decomposition import tucker as tl_tucker

import decomp
from tests import reference as ref

METHODS = ["gram", "svd"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape,ranks", [((6, 7, 8), (2, 3, 4)), ((3, 3, 16, 24), (3, 2, 5, 6))])
def test_hosvd_exact_low_rank(method, shape, ranks):
  x = ref.low_rank_tucker(np.random.default_rng(0), shape, ranks)
  t = decomp.hosvd(x, ranks, method=method)
  assert t.core.shape == ranks
  assert float(decomp.rel_error(jnp.asarray(x), t)) < 1e-12
  for u in t.factors:
    np.testing.assert_allclose(np.asarray(u).T @ np.asarray(u), np.eye(u.shape[1]), atol=1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_hosvd_error_bounds(method):
  """max_k tail_k <= best <= err <= sqrt(sum_k tail_k^2) <= sqrt(N) best."""
  rng = np.random.default_rng(1)
  x = rng.standard_normal((5, 6, 7, 8))
  ranks = (2, 3, 4, 5)
  t = decomp.hosvd(x, ranks, method=method)
  err = np.linalg.norm(x - np.asarray(decomp.reconstruct(t)))
  tails = [
    ref.tails(np.linalg.svd(ref.unfold(x, k), compute_uv=False))[r] for k, r in enumerate(ranks)
  ]
  assert max(tails) <= err <= np.sqrt(np.sum(np.square(tails))) * (1 + 1e-12)
  # ||x - xhat||^2 = ||x||^2 - ||core||^2 with orthonormal factors.
  assert err**2 == pytest.approx(np.sum(x**2) - np.sum(np.asarray(t.core) ** 2), rel=1e-9)


def test_hosvd_none_leaves_mode_alone():
  x = np.random.default_rng(2).standard_normal((3, 4, 5))
  t = decomp.hosvd(x, (None, 2, None))
  assert t.factors[0] is None and t.factors[2] is None
  assert t.core.shape == (3, 2, 5)
  assert decomp.num_params(t) == 3 * 2 * 5 + 4 * 2
  u = np.linalg.svd(ref.unfold(x, 1))[0][:, :2]
  np.testing.assert_allclose(
    np.asarray(decomp.reconstruct(t)),
    np.moveaxis(np.tensordot(u @ u.T, x, axes=(1, 1)), 0, 1),
    atol=1e-12,
  )


@pytest.mark.parametrize("method", METHODS)
def test_tucker2_matches_tensorly(method):
  x = np.random.default_rng(3).standard_normal((3, 3, 32, 48))
  t = decomp.tucker2(x, (8, 12), method=method)
  assert t.factors[:2] == (None, None)
  assert t.core.shape == (3, 3, 8, 12)
  assert decomp.num_params(t) == 9 * 8 * 12 + 32 * 8 + 48 * 12
  (core, factors), _ = partial_tucker(
    tl.tensor(x), rank=[8, 12], modes=[2, 3], init="svd", n_iter_max=0
  )
  err_tl = np.linalg.norm(x - tl.tenalg.multi_mode_dot(core, factors, modes=[2, 3]))
  err = np.linalg.norm(x - np.asarray(decomp.reconstruct(t)))
  assert err == pytest.approx(err_tl, rel=1e-9)
  # Same subspaces as TensorLy's (factors agree up to sign).
  for ours, theirs in zip(t.factors[2:], factors, strict=True):
    np.testing.assert_allclose(
      np.abs(np.asarray(ours).T @ theirs), np.eye(ours.shape[1]), atol=1e-8
    )


@pytest.mark.parametrize("method", METHODS)
def test_hooi_improves_on_hosvd_and_matches_tensorly(method):
  x = np.random.default_rng(4).standard_normal((6, 7, 8))
  ranks = (3, 3, 3)
  t, hist = decomp.hooi(x, ranks, n_iter=100, tol=1e-12, method=method)
  err = float(decomp.rel_error(jnp.asarray(x), t))
  err_hosvd = float(decomp.rel_error(jnp.asarray(x), decomp.hosvd(x, ranks)))
  h = np.asarray(hist)
  run = h[~np.isnan(h)]
  assert len(run) >= 1 and np.all(np.diff(run) <= 1e-12)
  assert err <= err_hosvd and err == pytest.approx(run[-1], rel=1e-9)
  core, factors = tl_tucker(tl.tensor(x), rank=list(ranks), init="svd", n_iter_max=100, tol=1e-14)
  err_tl = np.linalg.norm(x - tl.tucker_to_tensor((core, factors))) / np.linalg.norm(x)
  assert err == pytest.approx(err_tl, rel=1e-6)


def test_vmap_and_jit_over_stacked_kernels():
  xs = jax.random.normal(jax.random.key(0), (5, 3, 3, 16, 16), jnp.float32)
  batched = jax.jit(jax.vmap(lambda k: decomp.reconstruct(decomp.tucker2(k, (4, 4)))))(xs)
  for i in range(5):
    one = decomp.reconstruct(decomp.tucker2(xs[i], (4, 4)))
    np.testing.assert_allclose(np.asarray(batched[i]), np.asarray(one), atol=1e-5)


# --- tucker2_sweep: eigensolver-free alternating subspace iteration ----------------------


def test_tucker2_sweep_recovers_an_exact_rank_kernel():
  x = ref.low_rank_tucker(np.random.default_rng(1), (3, 3, 16, 24), (3, 3, 5, 6))
  t = decomp.tucker2_sweep(x, (5, 6))
  assert t.core.shape == (3, 3, 5, 6)
  assert float(decomp.rel_error(jnp.asarray(x), t)) < 1e-10
  for u in t.factors[2:]:
    np.testing.assert_allclose(np.asarray(u).T @ np.asarray(u), np.eye(u.shape[1]), atol=1e-12)


@pytest.mark.parametrize("shape,ranks", [((3, 3, 16, 16), (4, 4)), ((3, 3, 32, 64), (8, 16))])
def test_tucker2_sweep_error_is_the_reference_projection_and_beats_hosvd_on_random(shape, ranks):
  """The returned error is the float64 error of projecting on the returned factors, and on
  random (He-normal) kernels two sweeps are below HOSVD's error (as HOOI is)."""
  k = np.random.default_rng(2).standard_normal(shape)
  t = decomp.tucker2_sweep(k, ranks, n_sweeps=2)
  u_s, u_t = (np.asarray(u) for u in t.factors[2:])
  proj = np.einsum("hwst,sa,ua,tb,vb->hwuv", k, u_s, u_s, u_t, u_t, optimize=True)
  want = np.linalg.norm(k - proj) / np.linalg.norm(k)
  assert float(decomp.rel_error(jnp.asarray(k), t)) == pytest.approx(want, rel=1e-10)
  hosvd_err = float(decomp.rel_error(jnp.asarray(k), decomp.tucker2(k, ranks)))
  assert want < hosvd_err


def test_tucker2_sweep_more_sweeps_never_hurt_much_and_converge_to_hooi():
  k = np.random.default_rng(3).standard_normal((3, 3, 16, 16)) * np.geomspace(1, 1e-2, 16)
  errs = [
    float(decomp.rel_error(jnp.asarray(k), decomp.tucker2_sweep(k, (4, 4), n_sweeps=n)))
    for n in (1, 4, 32)
  ]
  hooi, _ = decomp.hooi(k, (None, None, 4, 4), n_iter=50, tol=0.0)
  best = float(decomp.rel_error(jnp.asarray(k), hooi))
  assert errs[2] <= errs[0] and errs[2] == pytest.approx(best, rel=1e-3)


def test_tucker2_sweep_zero_and_rank_deficient_kernels_stay_finite():
  z = decomp.tucker2_sweep(np.zeros((3, 3, 8, 8)), (2, 2))
  assert (
    np.all(np.isfinite(np.asarray(z.core))) and float(jnp.abs(decomp.reconstruct(z)).max()) == 0
  )
  x = ref.low_rank_tucker(np.random.default_rng(4), (3, 3, 8, 8), (3, 3, 1, 1))
  t = decomp.tucker2_sweep(x, (3, 3))  # ranks above the kernel's
  assert np.all(np.isfinite(np.asarray(decomp.reconstruct(t))))
  assert float(decomp.rel_error(jnp.asarray(x), t)) < 1e-6


def test_tucker2_sweep_jit_vmap_and_bad_input():
  ks = np.random.default_rng(5).standard_normal((3, 3, 3, 8, 8)).astype(np.float32)
  batched = jax.jit(jax.vmap(lambda k: decomp.reconstruct(decomp.tucker2_sweep(k, (2, 3)))))(ks)
  for i in range(3):
    one = decomp.reconstruct(decomp.tucker2_sweep(ks[i], (2, 3)))
    np.testing.assert_allclose(batched[i], one, rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match="n_sweeps must be an int >= 1"):
    decomp.tucker2_sweep(ks[0], (2, 3), n_sweeps=0)
  with pytest.raises(ValueError, match="ranks"):
    decomp.tucker2_sweep(ks[0], (9, 3))


def _steep_kernel(rng, shape, floor):
  """A random kernel whose two channel modes have singular values decaying geometrically
  from 1 to `floor` (a trained net's kernels are closer to this than to white noise)."""
  k = rng.standard_normal(shape)
  for mode in (2, 3):
    n = shape[mode]
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    k = np.moveaxis(np.tensordot(k, q * np.geomspace(1, floor, n), axes=([mode], [1])), -1, mode)
  return k


def test_tucker2_sweep_oversampled_reaches_hosvd_on_steep_spectra():
  """Plain sweeps converge slowly where the spectrum decays steadily (the ratio of
  consecutive singular values near r is close to 1); an oversampled block does not."""
  k = _steep_kernel(np.random.default_rng(6), (3, 3, 32, 32), 1e-3)
  ranks = (8, 8)
  hosvd = float(decomp.rel_error(jnp.asarray(k), decomp.tucker2(k, ranks)))
  plain = float(decomp.rel_error(jnp.asarray(k), decomp.tucker2_sweep(k, ranks, n_sweeps=1)))
  t = decomp.tucker2_sweep(k, ranks, n_sweeps=1, oversample=8)
  over = float(decomp.rel_error(jnp.asarray(k), t))
  assert plain > 1.01 * hosvd  # what oversampling is for
  assert over <= 1.01 * hosvd
  assert t.core.shape == (3, 3, 8, 8)
  for u in t.factors[2:]:
    assert u.shape == (32, 8)
    np.testing.assert_allclose(np.asarray(u).T @ np.asarray(u), np.eye(8), atol=1e-12)
  # The returned factors are what the error is measured on (float64 reference projection).
  u_s, u_t = (np.asarray(u) for u in t.factors[2:])
  proj = np.einsum("hwst,sa,ua,tb,vb->hwuv", k, u_s, u_s, u_t, u_t, optimize=True)
  assert over == pytest.approx(np.linalg.norm(k - proj) / np.linalg.norm(k), rel=1e-10)


def test_tucker2_sweep_oversampled_exact_rank_random_and_capped():
  x = ref.low_rank_tucker(np.random.default_rng(7), (3, 3, 16, 24), (3, 3, 5, 6))
  t = decomp.tucker2_sweep(x, (5, 6), n_sweeps=1, oversample=4)
  assert float(decomp.rel_error(jnp.asarray(x), t)) < 1e-10
  k = np.random.default_rng(8).standard_normal((3, 3, 16, 16))
  hosvd = float(decomp.rel_error(jnp.asarray(k), decomp.tucker2(k, (4, 4))))
  over = float(decomp.rel_error(jnp.asarray(k), decomp.tucker2_sweep(k, (4, 4), oversample=4)))
  assert over < hosvd
  # An oversampled block as large as the mode is the whole space: Rayleigh-Ritz is then
  # the exact eigenproblem of the projected Gram matrix, i.e. one HOOI half-step each.
  t = decomp.tucker2_sweep(k, (4, 4), n_sweeps=1, oversample=100)
  u_s = np.asarray(t.factors[2])
  h_s = np.asarray(decomp.tucker2(k, (4, 4)).factors[2])
  assert u_s.shape == (16, 4)
  np.testing.assert_allclose(u_s @ u_s.T, h_s @ h_s.T, atol=1e-10)  # HOSVD's U_S subspace
  assert float(decomp.rel_error(jnp.asarray(k), t)) <= hosvd * (1 + 1e-12)
  with pytest.raises(ValueError, match="oversample must be an int >= 0"):
    decomp.tucker2_sweep(k, (4, 4), oversample=-1)


def test_hooi_refuses_a_rank_above_the_product_of_the_others():
  """HOOI's sweep projects mode k on the other factors, an `(I_k, prod_j r_j)` matrix: a
  rank above that product cannot be reached (it crashed in the loop before)."""
  x = np.random.default_rng(0).standard_normal((1, 1, 2, 2))
  with pytest.raises(ValueError, match=r"hooi: ranks\[3\] = 2 exceeds 1.*\[1, 1\]"):
    decomp.hooi(x, (None, None, 1, 2))
  t, _ = decomp.hooi(x, (None, None, 2, 2))  # the largest ranks it allows still work
  np.testing.assert_allclose(np.asarray(decomp.reconstruct(t)), x, atol=1e-12)
