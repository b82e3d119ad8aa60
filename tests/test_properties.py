"""Hypothesis over random shapes, ranks and eps: decompositions meet their float64 bounds."""

import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import decomp
from tests import reference as ref

SETTINGS = settings(max_examples=20, deadline=None, derandomize=True)
dims = st.integers(min_value=1, max_value=7)


def _tensor(shape, seed):
  rng = np.random.default_rng(seed)
  return rng.standard_normal(shape) * np.exp(rng.uniform(-1, 1, shape))


@SETTINGS
@given(shape=st.lists(dims, min_size=2, max_size=4), seed=st.integers(0, 2**16), data=st.data())
def test_hosvd_bounds(shape, seed, data):
  x = _tensor(shape, seed)
  size = x.size
  ranks = tuple(data.draw(st.integers(1, min(n, size // n))) for n in shape)
  method = data.draw(st.sampled_from(["gram", "svd"]))
  t = decomp.hosvd(x, ranks, method=method)
  err = np.linalg.norm(x - np.asarray(decomp.reconstruct(t)))
  tails = [
    ref.tails(np.linalg.svd(ref.unfold(x, k), compute_uv=False))[r] for k, r in enumerate(ranks)
  ]
  tol = 1e-10 * np.linalg.norm(x)
  assert max(tails) - tol <= err <= np.sqrt(np.sum(np.square(tails))) + tol


@SETTINGS
@given(
  shape=st.lists(st.integers(2, 6), min_size=2, max_size=4),
  seed=st.integers(0, 2**16),
  eps=st.floats(0.02, 0.9),
  method=st.sampled_from(["gram", "svd"]),
)
def test_tt_eps_ranks_and_bound(shape, seed, eps, method):
  x = _tensor(shape, seed)
  ranks, _ = ref.tt_svd(x, eps)
  tt = decomp.tt_svd(x, eps=eps, method=method)
  assert tuple(c.shape[2] for c in tt.cores[:-1]) == ranks
  assert float(decomp.rel_error(jnp.asarray(x), tt)) <= eps + 1e-12


@SETTINGS
@given(
  shape=st.lists(st.integers(2, 6), min_size=3, max_size=4),
  seed=st.integers(0, 2**16),
  eps=st.floats(0.02, 0.9),
  method=st.sampled_from(["gram", "svd"]),
)
def test_tr_eps_bound(shape, seed, eps, method):
  x = _tensor(shape, seed)
  tr = decomp.tr_svd(x, eps=eps, method=method)
  r = tr.cores[0].shape[0] * tr.cores[0].shape[2]
  ranks, _ = ref.tr_svd(x, eps, tr.cores[0].shape[0])
  assert tuple(c.shape[0] for c in tr.cores) == ranks
  assert r == ranks[0] * ranks[1]
  assert float(decomp.rel_error(jnp.asarray(x), tr)) <= eps + 1e-12


@SETTINGS
@given(
  d=st.integers(1, 3),
  s=st.integers(1, 12),
  t=st.integers(1, 12),
  seed=st.integers(0, 2**16),
  data=st.data(),
)
def test_lowered_svd_eckart_young(d, s, t, seed, data):
  k = _tensor((d, d, s, t), seed)
  r = data.draw(st.integers(1, min(t, s * d * d)))
  f = decomp.lowered_svd(k, r, method=data.draw(st.sampled_from(["gram", "svd"])))
  sv = np.linalg.svd(k.reshape(-1, t), compute_uv=False)
  err = np.linalg.norm(k - np.asarray(decomp.reconstruct(f)))
  assert abs(err - ref.tails(sv)[r]) <= 1e-9 * np.linalg.norm(k)
