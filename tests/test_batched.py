"""Every static-rank decomposition runs under jit(vmap(...)) and equals one-at-a-time calls."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import decomp

CASES = {
  "hosvd": lambda k: decomp.hosvd(k, (2, 2, 4, 5)),
  "tucker2": lambda k: decomp.tucker2(k, (4, 5)),
  "hooi": lambda k: decomp.hooi(k, (2, 2, 4, 5), n_iter=5)[0],
  "cp_als": lambda k: decomp.cp_als(k, 6, n_iter=10)[0],
  "tt_svd": lambda k: decomp.tt_svd(k, ranks=(3, 6, 5)),
  "tr_svd": lambda k: decomp.tr_svd(k, ranks=(1, 3, 6, 5)),
  "lowered_svd": lambda k: decomp.lowered_svd(k, 5),
  "tiled_svd": lambda k: decomp.tiled_svd(decomp.lowered(k), grid=(2, 3), rank=3),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_jit_vmap_equals_loop(name):
  fn = CASES[name]
  xs = jax.random.normal(jax.random.key(0), (3, 3, 3, 8, 12), jnp.float64)
  batched = jax.jit(jax.vmap(lambda k: decomp.reconstruct(fn(k))))(xs)
  assert batched.shape[0] == 3
  for i in range(3):
    np.testing.assert_allclose(
      np.asarray(batched[i]), np.asarray(decomp.reconstruct(fn(xs[i]))), rtol=1e-9, atol=1e-9
    )
