"""CP-ALS against exact low-rank tensors and TensorLy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorly as tl
from tensorly.decomposition import parafac

import decomp
from tests import reference as ref


@pytest.mark.parametrize("shape,rank", [((6, 7, 8), 3), ((3, 3, 10, 12), 4)])
def test_exact_low_rank_recovered(shape, rank):
  x = ref.low_rank_cp(np.random.default_rng(0), shape, rank)
  cp, hist = decomp.cp_als(x, rank, n_iter=500, tol=0.0)
  assert float(decomp.rel_error(jnp.asarray(x), cp)) < 1e-8
  for f in cp.factors:
    np.testing.assert_allclose(np.linalg.norm(np.asarray(f), axis=0), 1.0, atol=1e-12)
  assert decomp.num_params(cp) == rank + sum(shape) * rank


def test_error_history_is_the_true_error_and_decreases():
  x = np.random.default_rng(1).standard_normal((5, 6, 7))
  cp, hist = decomp.cp_als(x, 4, n_iter=30, tol=0.0)
  h = np.asarray(hist)
  assert not np.any(np.isnan(h))
  assert np.all(np.diff(h) <= 1e-10)  # ALS never increases the error
  assert h[-1] == pytest.approx(float(decomp.rel_error(jnp.asarray(x), cp)), rel=1e-8)


def test_stops_at_tol_and_pads_history_with_nan():
  x = ref.low_rank_cp(np.random.default_rng(2), (5, 6, 7), 2)
  _, hist = decomp.cp_als(x, 2, n_iter=200, tol=1e-3)
  h = np.asarray(hist)
  ran = int(np.sum(~np.isnan(h)))
  assert 1 <= ran < 200 and np.all(np.isnan(h[ran:]))


@pytest.mark.parametrize("init", ["svd", "random"])
def test_rank_deficient_input_gives_no_nan(init):
  x = ref.low_rank_cp(np.random.default_rng(3), (4, 5, 6), 2)
  for y in (x, np.zeros_like(x)):
    cp, hist = decomp.cp_als(y, 8, n_iter=20, init=init, key=jax.random.key(1))
    for leaf in jax.tree_util.tree_leaves(cp):
      assert np.all(np.isfinite(np.asarray(leaf)))
    h = np.asarray(hist)
    assert not np.isnan(h[0]) and np.all(np.isfinite(h[~np.isnan(h)]))
    xhat = np.asarray(decomp.reconstruct(cp))
    assert np.all(np.isfinite(xhat))
    assert np.linalg.norm(y - xhat) <= 1e-6 * max(np.linalg.norm(y), 1.0)


def test_matches_tensorly_from_the_same_svd_init():
  x = np.random.default_rng(4).standard_normal((5, 6, 7))
  cp, _ = decomp.cp_als(x, 3, n_iter=25, tol=0.0, init="svd")
  tl_cp = parafac(tl.tensor(x), 3, n_iter_max=25, init="svd", tol=0.0, normalize_factors=True)
  err_tl = np.linalg.norm(x - tl.cp_to_tensor(tl_cp)) / np.linalg.norm(x)
  assert float(decomp.rel_error(jnp.asarray(x), cp)) == pytest.approx(err_tl, rel=1e-6)
