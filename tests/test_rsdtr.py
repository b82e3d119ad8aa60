"""RSDTR equals a brute-force float64 search over shifts and splits."""

import jax.numpy as jnp
import numpy as np
import pytest

import decomp
from tests import reference as ref


def _structured_kernel(rng, d, s, t):
  """A kernel with decaying spectra in every mode, so that eps truncates."""
  x = rng.standard_normal((d, d, s, t))
  for axis, n in ((2, s), (3, t)):
    shape = [1, 1, 1, 1]
    shape[axis] = n
    x = x * np.exp(-np.arange(n) / (n / 4)).reshape(shape)
  return x


def test_random_kernel_equals_brute_force_and_bounds_prune():
  """Flat spectra (the loosest bounds): still the brute-force winner; some candidates skipped."""
  kernel = np.random.default_rng(5).standard_normal((3, 3, 24, 24))
  res = decomp.rsdtr(kernel, eps=0.3)
  (storage, shift, _), table = _brute_force(kernel, 0.3)
  assert res.num_params() == storage and res.shift == shift
  assert all(lower <= table[c] for c, _, lower in res.candidates)
  assert any(found is None for _, found, _ in res.candidates)


def _brute_force(kernel, eps):
  ring = np.transpose(kernel, (2, 0, 1, 3))  # (S, d_h, d_w, T)
  best, table = None, {}
  for shift in range(4):
    x = np.transpose(ring, [(shift + k) % 4 for k in range(4)])
    r = ref.eps_rank(
      np.linalg.svd(x.reshape(x.shape[0], -1), compute_uv=False),
      eps / np.sqrt(3) * np.linalg.norm(x),
    )
    for r0 in [d for d in range(1, r + 1) if r % d == 0]:
      ranks, _ = ref.tr_svd(x, eps, r0)
      storage = ref.tr_storage(x.shape, ranks)
      table[shift, r0, r // r0] = storage
      if best is None or (storage, shift, r0) < best:
        best = (storage, shift, r0)
  return best, table


@pytest.mark.parametrize("method", ["gram", "svd"])
@pytest.mark.parametrize("shape,eps", [((3, 16, 24), 0.3), ((3, 12, 12), 0.5), ((1, 16, 8), 0.2)])
def test_equals_brute_force(method, shape, eps):
  d, s, t = shape
  kernel = _structured_kernel(np.random.default_rng(0), d, s, t)
  res = decomp.rsdtr(kernel, eps=eps, method=method)
  (storage, shift, _), table = _brute_force(kernel, eps)
  assert {c for c, _, _ in res.candidates} == set(table)
  for cand, found, lower in res.candidates:
    assert lower <= table[cand]  # a valid bound
    if found is None:  # skipped: it could not have won
      assert lower >= storage
    else:
      assert found == table[cand]
  assert res.num_params() == storage and res.shift == shift
  assert float(decomp.rel_error(jnp.asarray(kernel), res)) <= eps
  # Cores in the ring order (S, d_h, d_w, T) whichever shift won.
  r = res.ranks
  assert [c.shape for c in res.tr.cores] == [
    (r[0], s, r[1]),
    (r[1], d, r[2]),
    (r[2], d, r[3]),
    (r[3], t, r[0]),
  ]
  assert (
    decomp.num_params(res) == r[0] * s * r[1] + r[1] * d * r[2] + r[2] * d * r[3] + r[3] * t * r[0]
  )


def test_stack_equals_one_at_a_time():
  rng = np.random.default_rng(1)
  kernels = np.stack([_structured_kernel(rng, 3, 12, 16) for _ in range(3)])
  many = decomp.rsdtr_stack(kernels, eps=0.3)
  for k, res in zip(kernels, many, strict=True):
    one = decomp.rsdtr(k, eps=0.3)
    assert one.storage == res.storage and one.ranks == res.ranks
    np.testing.assert_allclose(
      np.asarray(decomp.reconstruct(one)), np.asarray(decomp.reconstruct(res)), atol=1e-10
    )


def test_many_groups_shapes():
  rng = np.random.default_rng(2)
  ks = [
    _structured_kernel(rng, 3, 8, 8),
    _structured_kernel(rng, 1, 8, 16),
    _structured_kernel(rng, 3, 8, 8),
  ]
  out = decomp.rsdtr_many(ks, eps=0.4)
  for k, res in zip(ks, out, strict=True):
    assert res.storage == decomp.rsdtr(k, eps=0.4).storage
    assert float(decomp.rel_error(jnp.asarray(k), res)) <= 0.4


def test_float32_error_within_bound():
  kernel = _structured_kernel(np.random.default_rng(3), 3, 32, 32).astype(np.float32)
  res = decomp.rsdtr(kernel, eps=0.3)
  assert res.tr.cores[0].dtype == jnp.float32
  assert float(decomp.rel_error(jnp.asarray(kernel), res)) <= 0.3 * (1 + 1e-5)


def test_pad_grid():
  """Pads cover `n`, never shrink as `n` grows, and waste under 50% (<= 7 above 24)."""
  from decomp.rsdtr import _pad

  pads = [_pad(n) for n in range(1, 600)]
  assert all(p >= n for n, p in enumerate(pads, 1))
  assert pads == sorted(pads)
  assert all(p < 1.5 * n if n <= 24 else p - n <= 7 for n, p in enumerate(pads, 1))
  assert sorted(set(pads[:64])) == [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 40, 48, 56, 64]


def test_search_runs_single_threaded_blas(monkeypatch):
  """The search's LAPACK calls run with one BLAS thread (decomp._blas); the limit is
  lifted afterwards."""
  import importlib

  import scipy.linalg  # noqa: F401  (loads the BLAS under jaxlib's LAPACK kernels)
  import threadpoolctl

  rsdtr_mod = importlib.import_module("decomp.rsdtr")

  def blas_threads():
    return {
      i["filepath"]: i["num_threads"]
      for i in threadpoolctl.threadpool_info()
      if i["user_api"] == "blas"
    }

  before = blas_threads()
  seen = []
  rounds = rsdtr_mod._rounds
  monkeypatch.setattr(rsdtr_mod, "_rounds", lambda *a: (seen.append(blas_threads()), rounds(*a)))
  decomp.rsdtr(np.random.default_rng(0).standard_normal((3, 3, 4, 5)), eps=0.3)
  assert seen and seen[0] and set(seen[0].values()) == {1}
  assert blas_threads() == before
