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


_F32 = np.finfo(np.float32)


def _all(kernel, data):
  """Every public decomposition of a `(d, d, S, T)` kernel, ranks drawn once per example."""
  d, _, s, t = kernel.shape
  r_s = data.draw(st.integers(1, min(s, d * d * t)))
  r_t = data.draw(st.integers(1, min(t, d * d * r_s)))
  r_s = min(r_s, d * d * r_t)  # each Tucker rank at most the product of the others (hooi)
  eps = data.draw(st.floats(0.05, 0.9))
  rank = data.draw(st.integers(1, min(t, kernel.size // t)))
  return eps, {
    "tucker2": lambda k: decomp.tucker2(k, (r_s, r_t)),
    "hosvd": lambda k: decomp.hosvd(k, (None, None, r_s, r_t)),
    "hooi": lambda k: decomp.hooi(k, (None, None, r_s, r_t), n_iter=3)[0],
    "tucker2_sweep": lambda k: decomp.tucker2_sweep(k, (r_s, r_t)),
    "cp_als": lambda k: decomp.cp_als(k, rank, n_iter=5)[0],
    "tt_svd": lambda k: decomp.tt_svd(k, eps=eps),
    "tr_svd": lambda k: decomp.tr_svd(k, eps=eps),
    "lowered_svd": lambda k: decomp.lowered_svd(k, rank),
    "tiled_svd": lambda k: decomp.tiled_svd(k.reshape(-1, t), grid=(1, 1), rank=rank),
    "rsdtr": lambda k: decomp.rsdtr(k, eps=eps),
  }


def _rel(x, f):
  y = np.asarray(decomp.reconstruct(f), np.float64).reshape(x.shape)
  x = np.asarray(x, np.float64)
  return np.linalg.norm(x - y) / np.linalg.norm(x)


@settings(max_examples=12, deadline=None, derandomize=True)
@given(
  d=st.integers(1, 3),
  s=st.integers(1, 8),
  t=st.integers(1, 8),
  seed=st.integers(0, 2**16),
  exponent=st.one_of(st.floats(-30, 30), st.sampled_from([-44.0, -39.0, 37.5, 38.4])),
  data=st.data(),
)
def test_every_decomposition_is_exact_at_any_scale_or_says_why(d, s, t, seed, exponent, data):
  """float32 kernels scaled by 10^exponent: each public decomposition gives finite factors
  whose relative error is the one at scale 1 (to float32 rounding) and within eps for the
  eps methods, or, for an input the dtype cannot hold (norm overflow, entries below the
  smallest normal), a `ValueError`. Never another exception, never NaN."""
  unit = _tensor((d, d, s, t), seed).astype(np.float32)
  unit /= np.max(np.abs(unit))
  x = (unit.astype(np.float64) * 10.0**exponent).astype(np.float32)
  hi = float(np.max(np.abs(x)))
  unholdable = hi * np.sqrt(x.size) > _F32.max or 0 < hi < _F32.tiny
  eps, fns = _all(x, data)
  for name, fn in fns.items():
    if unholdable:
      try:
        fn(jnp.asarray(x))
      except ValueError as e:
        assert "float32" in str(e), (name, str(e))
        continue
      raise AssertionError(f"{name}: no ValueError for max|x| = {hi:.3g}, size {x.size}")
    if hi == 0:
      continue
    f = fn(jnp.asarray(x))
    leaves = [np.asarray(a) for a in __import__("jax").tree.leaves(f)]
    assert all(np.all(np.isfinite(a)) for a in leaves), name
    got = _rel(x, f)
    want = _rel(unit, fn(jnp.asarray(unit)))
    assert abs(got - want) <= 1e-4 + 1e-3 * want, (name, exponent, got, want)
    if name in ("tt_svd", "tr_svd", "rsdtr"):
      assert got <= eps + 1e-5, (name, got, eps)
