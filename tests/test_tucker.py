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
