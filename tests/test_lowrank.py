"""Lowered and tiled SVD: errors equal the Eckart-Young tails (float64 numpy)."""

import jax.numpy as jnp
import numpy as np
import pytest

import decomp
from tests import reference as ref


@pytest.mark.parametrize("method", ["gram", "svd"])
@pytest.mark.parametrize("shape", [(3, 3, 16, 32), (3, 3, 64, 16), (1, 1, 24, 24), (5, 3, 4, 8)])
def test_lowered_svd_is_eckart_young(method, shape):
  kernel = np.random.default_rng(0).standard_normal(shape)
  d_h, d_w, s, t = shape
  w = np.asarray(decomp.lowered(jnp.asarray(kernel)))
  assert w.shape == (t, s * d_h * d_w)
  # Independent check of the layout: W[t, (s, h, w)] = K[h, w, s, t].
  assert w[1, (2 % s) * d_h * d_w + 0] == kernel[0, 0, 2 % s, 1]
  np.testing.assert_array_equal(np.asarray(decomp.unlowered(jnp.asarray(w), shape)), kernel)
  sv = np.linalg.svd(w, compute_uv=False)
  for r in (1, min(w.shape) // 2, min(w.shape)):
    f = decomp.lowered_svd(kernel, r, method=method)
    assert f.u.shape == (d_h, d_w, s, r) and f.v.shape == (r, t)
    err = np.linalg.norm(kernel - np.asarray(decomp.reconstruct(f)))
    assert err == pytest.approx(ref.tails(sv)[r], abs=1e-10 * np.linalg.norm(kernel))
    assert decomp.num_params(f) == r * (d_h * d_w * s + t)


@pytest.mark.parametrize("method", ["gram", "svd"])
@pytest.mark.parametrize("grid", [(1, 1), (2, 3), (4, 1), (1, 6)])
def test_tiled_svd_is_per_tile_eckart_young(method, grid):
  m = np.random.default_rng(1).standard_normal((16, 36))
  a, b = 16 // grid[0], 36 // grid[1]
  k = min(a, b) // 2
  f = decomp.tiled_svd(m, grid=grid, rank=k, method=method)
  expected = 0.0
  for i in range(grid[0]):
    for j in range(grid[1]):
      tile = m[i * a : (i + 1) * a, j * b : (j + 1) * b]
      expected += ref.tails(np.linalg.svd(tile, compute_uv=False))[k] ** 2
  err = np.linalg.norm(m - np.asarray(decomp.reconstruct(f)))
  assert err == pytest.approx(np.sqrt(expected), rel=1e-9)
  assert decomp.num_params(f) == k * (grid[1] * 16 + grid[0] * 36)


def test_tiled_svd_rank_reaches_ratio():
  for shape, grid, ratio in [
    ((64, 576), (2, 2), 0.1),
    ((64, 576), (4, 8), 0.25),
    ((32, 32), (1, 1), 1.0),
  ]:
    k = decomp.tiled_svd_rank(shape, grid, ratio=ratio)
    per = grid[1] * shape[0] + grid[0] * shape[1]
    assert k * per <= ratio * shape[0] * shape[1]
    assert (k + 1) * per > ratio * shape[0] * shape[1] or k == min(
      shape[0] // grid[0], shape[1] // grid[1]
    )
