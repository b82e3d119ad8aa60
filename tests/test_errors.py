"""Every bad input raises ValueError naming the argument, the value and the allowed range."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import decomp

K = np.random.default_rng(0).standard_normal((3, 3, 8, 16)).astype(np.float32)


def _nan(x):
  y = x.copy()
  y.flat[5] = np.nan
  return y


def _inf(x):
  y = x.copy()
  y.flat[3] = np.inf
  return y


CASES = [
  (lambda: decomp.tucker2(K, (0, 4)), r"ranks\[0\] \(r_S\)=0 .*\[1, 8\]"),
  (lambda: decomp.tucker2(K, (4, 17)), r"ranks\[1\] \(r_T\)=17 .*\[1, 16\]"),
  (lambda: decomp.tucker2(K[0], (4, 4)), r"kernel must be 4-way, got shape \(3, 8, 16\)"),
  (lambda: decomp.tucker2(_nan(K), (4, 4)), r"kernel contains NaN or Inf"),
  (lambda: decomp.tucker2(K, 4), r"ranks must be a pair"),
  (lambda: decomp.hosvd(K, (1, 1, 9, 1)), r"ranks\[2\]=9 .*\[1, 8\]"),
  (lambda: decomp.hosvd(_inf(K), 2), r"x contains NaN or Inf"),
  (lambda: decomp.hosvd(K, (1, 2)), r"ranks must be an int or a sequence of 4 ints"),
  (lambda: decomp.hooi(K, 2, n_iter=0), r"n_iter=0 .*\[1, "),
  (lambda: decomp.hooi(K, 2, tol=-1.0), r"tol must be >= 0, got -1.0"),
  (lambda: decomp.cp_als(K, 0), r"rank=0 .*\[1, "),
  (lambda: decomp.cp_als(K, 3, init="foo"), r"init must be 'svd' or 'random', got 'foo'"),
  (lambda: decomp.cp_als(_nan(K), 3), r"x contains NaN or Inf"),
  (lambda: decomp.tt_svd(K, eps=0.0), r"eps=0.0 is outside the allowed range \(0, 1\)"),
  (lambda: decomp.tt_svd(K, eps=1.0), r"eps=1.0 is outside the allowed range \(0, 1\)"),
  (lambda: decomp.tt_svd(K, eps=-0.2), r"eps=-0.2 is outside"),
  (lambda: decomp.tt_svd(K), r"give exactly one of ranks= or eps="),
  (lambda: decomp.tt_svd(K, ranks=2, eps=0.1), r"give exactly one of ranks= or eps="),
  (lambda: decomp.tt_svd(K, ranks=(3, 10, 16)), r"ranks\[1\]=10 .*\[1, 9\]"),
  (lambda: decomp.tt_svd(K, ranks=(3, 9)), r"sequence of 3 ints"),
  (lambda: decomp.tr_svd(K, ranks=(2, 2, 4, 4)), r"ranks\[0\] \* ranks\[1\] = 4 .*\[1, 3\]"),
  (lambda: decomp.tr_svd(K, ranks=(1, 3, 0, 4)), r"ranks\[2\]=0 .*\[1, 9\]"),
  (lambda: decomp.tr_svd(K, eps=1.5), r"eps=1.5 is outside"),
  (lambda: decomp.tr_svd(K, eps=0.01, split=2), r"split=2 does not divide the first rank 3"),
  (lambda: decomp.tr_svd(K, ranks=(1, 3, 9, 4), split=1), r"split= goes with eps="),
  (lambda: decomp.tr_svd(np.ones(5, np.float32), eps=0.1), r"x must have at least 2 modes"),
  (lambda: decomp.rsdtr(K, eps=0.0), r"eps=0.0 is outside"),
  (lambda: decomp.rsdtr(K[..., 0], eps=0.3), r"kernel must be 4-way"),
  (lambda: decomp.rsdtr(_nan(K), eps=0.3), r"kernel contains NaN or Inf"),
  (lambda: decomp.rsdtr_many([K, K[:, :, :8], _inf(K)], eps=0.3), r"kernels\[2\] contains NaN"),
  (lambda: decomp.rsdtr_stack(np.stack([K, _nan(K)]), eps=0.3), r"kernels\[1\] contains NaN"),
  (lambda: decomp.rsdtr(K, eps=0.3, method="qr"), r"method must be 'gram' or 'svd', got 'qr'"),
  (lambda: decomp.lowered_svd(K, 17), r"rank=17 .*\[1, 16\]"),
  (lambda: decomp.lowered_svd(K, 0), r"rank=0 .*\[1, 16\]"),
  (
    lambda: decomp.tiled_svd(np.ones((6, 9)), grid=(4, 3), rank=1),
    r"grid\[0\]=4 does not divide the matrix dimension 6",
  ),
  (lambda: decomp.tiled_svd(np.ones((6, 9)), grid=(2, 3), rank=4), r"rank=4 .*\[1, 3\]"),
  (lambda: decomp.tiled_svd(np.ones((6, 9)), grid=(2,), rank=1), r"grid must be a pair"),
  (lambda: decomp.tiled_svd_rank((64, 64), (1, 1), ratio=0.001), r"ratio=0.001 is below"),
  (lambda: decomp.tucker2_ranks((3, 3, 8, 8), ratio=1.5), r"ratio=1.5 is outside .*\(0, 1\]"),
  (lambda: decomp.tucker2_ranks((3, 3, 8, 8), ratio=0.0), r"ratio=0.0 is outside"),
  (lambda: decomp.tucker2(np.ones((3, 3, 8, 8), np.int32), (2, 2)), r"floating-point"),
  (
    lambda: decomp.rel_error(K, decomp.lowered_svd(K[:, :, :4], 2)),
    r"x has shape \(3, 3, 8, 16\) but the factorization reconstructs shape \(3, 3, 4, 16\)",
  ),
]


@pytest.mark.parametrize("call,match", CASES)
def test_bad_input_raises_value_error(call, match):
  with pytest.raises(ValueError, match=match):
    call()


# --- library inputs (the reliability issue, section 5) --------------------------------


def test_half_precision_tucker2_computes_in_float32_and_returns_the_input_dtype():
  k = jax.random.normal(jax.random.key(0), (3, 3, 16, 24), jnp.float32)
  want = decomp.rel_error(k, decomp.tucker2(k, (4, 6)))
  for dt in (jnp.float16, jnp.bfloat16):
    t = decomp.tucker2(k.astype(dt), (4, 6))
    assert t.core.dtype == dt and t.factors[2].dtype == dt
    assert float(decomp.rel_error(k, t)) == pytest.approx(float(want), abs=2e-2)
    lr = decomp.lowered_svd(k.astype(dt), 5)
    assert lr.u.dtype == dt


def test_tucker2_rank_errors_name_the_argument_as_written():
  k = jnp.ones((3, 3, 8, 4), jnp.float32)
  with pytest.raises(
    ValueError, match=r"ranks\[0\] \(r_S\)=0 is outside the allowed range \[1, 8\]"
  ):
    decomp.tucker2(k, (0, 4))
  with pytest.raises(
    ValueError, match=r"ranks\[1\] \(r_T\)=5 is outside the allowed range \[1, 4\]"
  ):
    decomp.tucker2(k, (2, 5))


@pytest.mark.parametrize("scale", [1e-30, 1e-20, 1e18, 1e19, 1e30])
def test_gram_route_and_rel_error_are_scale_invariant(scale):
  k = jax.random.normal(jax.random.key(1), (3, 3, 32, 32), jnp.float32)
  ref = float(decomp.rel_error(k, decomp.tucker2(k, (8, 8), method="svd")))
  ks = k * jnp.float32(scale)
  got = decomp.tucker2(ks, (8, 8))
  assert np.isfinite(np.asarray(got.core)).all()
  assert float(decomp.rel_error(ks, got)) == pytest.approx(ref, rel=1e-4)


def test_rsdtr_refuses_an_eps_below_the_float32_floor():
  k = jax.random.normal(jax.random.key(2), (3, 3, 4, 4), jnp.float32)
  with pytest.raises(
    ValueError, match=r"eps=1e-09 is below what float32 can deliver \(floor 7.6e-06\)"
  ):
    decomp.rsdtr(k, eps=1e-9)
  with pytest.raises(ValueError, match="floor"):
    decomp.rsdtr_many([k], eps=1e-7)


@pytest.mark.parametrize(
  "text,match",
  [
    ("[1, 2]", "expected an object"),
    ('{"a.conv": 3}', "entry 'a.conv' is a int"),
    ('{"a.conv": {"method": "magic", "ranks": [2]}}', "method 'magic'"),
    ('{"a.conv": {"method": "svd", "ranks": [2], "colour": 1}}', r"unknown key\(s\) \['colour'\]"),
    ('{"a.conv": {"method": "svd"}}', "has no ranks"),
    ("{not json", "not JSON"),
  ],
)
def test_plan_from_json_names_the_bad_entry(text, match):
  import tnn

  with pytest.raises(ValueError, match=match):
    tnn.Plan.from_json(text)


def test_a_plan_made_for_another_model_is_refused():
  from flax import nnx

  import tnn

  small = tnn.models.cnn(10, rngs=nnx.Rngs(0), in_channels=1, widths=(8, 16, 16))
  wide = tnn.models.cnn(10, rngs=nnx.Rngs(0), in_channels=1, widths=(16, 32, 32))
  plan = tnn.make_plan(small, "tucker2", ratio=0.25)  # same paths as `wide`'s
  again = tnn.Plan.from_json(plan.to_json())
  assert again == plan and again.shapes == plan.shapes
  for p in (plan, again):
    with pytest.raises(
      ValueError,
      match=r"was made for a weight of shape \(3, 3, 8, 8\); this model.s is \(3, 3, 16, 16\)",
    ):
      tnn.compress(wide, p)
