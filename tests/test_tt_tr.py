"""TT-SVD and TR-SVD against float64 numpy references and TensorLy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorly as tl
from tensorly.decomposition import tensor_ring, tensor_train

import decomp
from tests import reference as ref

METHODS = ["gram", "svd"]


def _rel(x, f):
  return float(decomp.rel_error(jnp.asarray(x), f))


@pytest.mark.parametrize("method", METHODS)
def test_tt_exact_low_rank(method):
  rng = np.random.default_rng(0)
  cores = [rng.standard_normal(s) for s in [(1, 4, 2), (2, 5, 3), (3, 6, 2), (2, 7, 1)]]
  x = np.asarray(decomp.reconstruct(decomp.TT(tuple(map(jnp.asarray, cores)))))
  tt = decomp.tt_svd(x, ranks=(2, 3, 2), method=method)
  assert _rel(x, tt) < 1e-12
  tt_eps = decomp.tt_svd(x, eps=1e-6, method=method)
  assert [c.shape[2] for c in tt_eps.cores[:-1]] == [2, 3, 2]
  # Left-orthonormal cores.
  for c in tt.cores[:-1]:
    m = np.asarray(c).reshape(-1, c.shape[2])
    np.testing.assert_allclose(m.T @ m, np.eye(c.shape[2]), atol=1e-12)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("eps", [0.05, 0.3, 0.6])
def test_tt_eps_matches_reference_ranks_and_bound(method, eps):
  x = np.random.default_rng(1).standard_normal((3, 3, 16, 24))
  x *= np.linspace(1, 3, 24)  # a non-flat spectrum
  ranks, cores = ref.tt_svd(x, eps)
  tt = decomp.tt_svd(x, eps=eps, method=method)
  assert tuple(c.shape[2] for c in tt.cores[:-1]) == ranks
  err = _rel(x, tt)
  assert err <= eps
  assert err == pytest.approx(np.linalg.norm(x - ref.tr_full(cores)) / np.linalg.norm(x), rel=1e-8)
  assert decomp.num_params(tt) == sum(c.size for c in cores)


def test_tt_matches_tensorly():
  x = np.random.default_rng(2).standard_normal((4, 5, 6, 7))
  tt = decomp.tt_svd(x, ranks=(3, 6, 5))
  theirs = tensor_train(tl.tensor(x), rank=[1, 3, 6, 5, 1])
  err_tl = np.linalg.norm(x - tl.tt_to_tensor(theirs)) / np.linalg.norm(x)
  assert _rel(x, tt) == pytest.approx(err_tl, rel=1e-9)


@pytest.mark.parametrize("method", METHODS)
def test_tr_exact_low_rank(method):
  """A low-rank ring is reconstructed exactly at the ranks TR-SVD's unfoldings have.

  TR-SVD does not in general find the generating ring ranks: the basis it picks for the
  first rank space is not Kronecker-structured over `R_0 x R_1`. Its own exact ranks are
  the numerical ranks of the unfoldings it meets, found here by the float64 reference.
  """
  rng = np.random.default_rng(3)
  shape = (12, 5, 4, 7)
  x = ref.tr_full(ref.random_tr(rng, shape, (2, 3, 4, 3)))
  ranks, _ = ref.tr_svd(x, 1e-10, 2)
  assert ranks[0] * ranks[1] == 2 * 3
  tr = decomp.tr_svd(x, ranks=ranks, method=method)
  assert _rel(x, tr) < 1e-11
  assert decomp.num_params(tr) == ref.tr_storage(shape, ranks)
  # A tensor train is a ring with R_0 = 1: exact at its generating ranks.
  y = ref.tr_full(ref.random_tr(rng, shape, (1, 3, 4, 3)))
  assert _rel(y, decomp.tr_svd(y, ranks=(1, 3, 4, 3), method=method)) < 1e-11


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("eps", [0.1, 0.3, 0.5])
def test_tr_eps_equals_reference_for_every_split(method, eps):
  x = np.random.default_rng(4).standard_normal((16, 3, 3, 12))
  x *= np.linspace(0.2, 2, 16)[:, None, None, None]
  r = ref.eps_rank(
    np.linalg.svd(x.reshape(16, -1), compute_uv=False), eps / np.sqrt(3) * np.linalg.norm(x)
  )
  for r0 in [d for d in range(1, r + 1) if r % d == 0]:
    ranks, cores = ref.tr_svd(x, eps, r0)
    tr = decomp.tr_svd(x, eps=eps, split=r0, method=method)
    assert tuple(c.shape[0] for c in tr.cores) == ranks
    err = _rel(x, tr)
    assert err <= eps
    ref_err = np.linalg.norm(x - ref.tr_full(cores)) / np.linalg.norm(x)
    assert err == pytest.approx(ref_err, rel=1e-7)


def test_tr_default_split_is_balanced():
  x = np.random.default_rng(5).standard_normal((12, 4, 4, 4))
  tr = decomp.tr_svd(x, eps=0.01)
  r0, r1 = tr.cores[0].shape[0], tr.cores[0].shape[2]
  assert r0 * r1 == 12 and (r0, r1) == (3, 4)


def test_tr_matches_tensorly_mode0():
  # TensorLy's tensor_ring is right for mode=0 (see DESIGN.md on mode >= 2).
  x = np.random.default_rng(6).standard_normal((6, 5, 4, 7))
  ranks = (2, 3, 4, 3)
  tr = decomp.tr_svd(x, ranks=ranks)
  theirs = tensor_ring(tl.tensor(x), rank=[*ranks, ranks[0]], mode=0)
  err_tl = np.linalg.norm(x - tl.tr_to_tensor(theirs)) / np.linalg.norm(x)
  assert _rel(x, tr) == pytest.approx(err_tl, rel=1e-9)


def test_jit_vmap_static_ranks():
  xs = jax.random.normal(jax.random.key(0), (4, 8, 3, 3, 8), jnp.float32)
  f = jax.jit(jax.vmap(lambda x: decomp.reconstruct(decomp.tr_svd(x, ranks=(2, 2, 4, 4)))))
  out = f(xs)
  for i in range(4):
    one = decomp.reconstruct(decomp.tr_svd(xs[i], ranks=(2, 2, 4, 4)))
    np.testing.assert_allclose(np.asarray(out[i]), np.asarray(one), atol=1e-5)
