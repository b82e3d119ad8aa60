"""Every factorized layer against the dense conv/matmul with its reconstructed weight."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tnn import layers as L
from tnn import ops

F64 = jnp.float64

# (class, hyper-parameters after (S=8, T=12, kernel 3)); each kind, m-forms with m = 2.
CONV = [
  (L.SVDConv, (5,)),
  (L.TuckerConv, ((4, 5),)),
  (L.CPConv, (6,)),
  (L.TRConv, ((2, 3, 4, 2),)),
  (L.TTConv, ((3, 4, 2),)),
  (L.MCPConv, ((2, 4), (3, 4), 5)),
  (L.MTKConv, ((2, 4), (3, 4), (2, 3, 4))),
  (L.MTTConv, ((2, 4), (3, 4), (3, 2))),
  (L.MTRConv, ((2, 4), (3, 4), (2, 3, 2))),
]
DENSE = [
  (L.SVDDense, (3,)),
  (L.CPDense, ((2, 4), (3, 4), 5)),
  (L.TuckerDense, ((2, 4), (3, 4), (2, 3))),
  (L.TTDense, ((2, 4), (3, 4), (3,))),
  (L.TRDense, ((2, 4), (3, 4), (2, 3))),
]
ids = lambda cases: [c.__name__ for c, _ in cases]  # noqa: E731


def _grads(layer, x, path):
  """Gradients of `<path(x), c>` for a fixed random cotangent, wrt x and every param."""
  graph, state = nnx.split(layer)

  def f(state, x):
    m = nnx.merge(graph, state)
    y = m.factorized(x) if path == "factorized" else m.reconstructed(x)
    c = jax.random.normal(jax.random.key(7), y.shape, y.dtype)
    return jnp.sum(y * c), y

  (_, y), (gs, gx) = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(state, x)
  return y, gx, gs


def _check_paths(layer, x):
  y1, gx1, gs1 = _grads(layer, x, "factorized")
  y2, gx2, gs2 = _grads(layer, x, "reconstructed")
  scale = float(jnp.max(jnp.abs(y2)))
  np.testing.assert_allclose(y1, y2, rtol=0, atol=1e-12 * scale)
  np.testing.assert_allclose(gx1, gx2, rtol=1e-10, atol=1e-12 * float(jnp.max(jnp.abs(gx2))))
  for a, b in zip(jax.tree.leaves(gs1), jax.tree.leaves(gs2), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12 * float(jnp.max(jnp.abs(b))))


@pytest.mark.parametrize("cls,hyper", CONV, ids=ids(CONV))
@pytest.mark.parametrize(
  "strides,padding,hw",
  [
    (1, "SAME", (9, 7)),
    (2, "SAME", (9, 7)),
    # Even sizes with stride 2: "SAME" then pads unevenly (0 before, 1 after), so a stride
    # moved off the conv that carries it (a stride-1 conv, then a subsample) shows here;
    # on odd sizes it gives the same output.
    (2, "SAME", (8, 8)),
    (2, "SAME", (32, 32)),
    ((2, 1), "VALID", (9, 7)),
    ((2, 1), "VALID", (8, 8)),
  ],
)
def test_conv_factorized_equals_reconstructed(cls, hyper, strides, padding, hw):
  layer = cls(8, 12, 3, *hyper, strides=strides, padding=padding, rngs=nnx.Rngs(0), param_dtype=F64)
  layer.bias[...] = jnp.arange(12, dtype=F64)
  x = jax.random.normal(jax.random.key(1), (2, *hw, 8), F64)
  _check_paths(layer, x)
  assert layer(x).shape == ops.conv_out_shape(
    x.shape, (3, 3), 12, strides=layer.strides, padding=padding
  )


@pytest.mark.parametrize("cls,hyper", DENSE, ids=ids(DENSE))
def test_dense_factorized_equals_reconstructed(cls, hyper):
  layer = cls(8, 12, *hyper, rngs=nnx.Rngs(0), param_dtype=F64)
  _check_paths(layer, jax.random.normal(jax.random.key(1), (3, 8), F64))


def test_rectangular_kernel():
  layer = L.TRConv(4, 6, (3, 1), (1, 2, 3, 2), rngs=nnx.Rngs(0), param_dtype=F64)
  _check_paths(layer, jax.random.normal(jax.random.key(1), (1, 6, 5, 4), F64))


@pytest.mark.parametrize("cls,hyper", [CONV[5], CONV[7], DENSE[1]], ids=["mcp", "mtt", "cp_dense"])
def test_forward_picks_the_path_call_runs(cls, hyper):
  """`forward` only picks which of the two (equal, above) paths `__call__` runs."""
  args = (8, 12, 3) if issubclass(cls, L.FactorizedConv) else (8, 12)
  x = jax.random.normal(jax.random.key(1), (2, 9, 7, 8) if len(args) == 3 else (3, 8), F64)
  kw = dict(param_dtype=F64)
  default = cls(*args, *hyper, rngs=nnx.Rngs(0), **kw)
  rec = cls(*args, *hyper, forward="reconstructed", rngs=nnx.Rngs(0), **kw)  # same factors
  assert default.forward == "factorized"
  np.testing.assert_array_equal(default(x), default.factorized(x))
  np.testing.assert_array_equal(rec(x), rec.reconstructed(x))
  assert float(jnp.max(jnp.abs(rec(x) - default.factorized(x)))) > 0  # a different route
  y = default(x)
  np.testing.assert_allclose(rec(x), y, rtol=0, atol=1e-12 * float(jnp.max(jnp.abs(y))))
  assert rec.macs(x.shape) == default.macs(x.shape)  # the method's cost either way
  with pytest.raises(ValueError, match="forward 'dense'.*allowed"):
    cls(*args, *hyper, forward="dense", rngs=nnx.Rngs(0), **kw)


# Exact-rank conversion: a kernel built from factors of these ranks converts losslessly.
EXACT = [
  (L.SVDConv, (5,)),
  (L.TuckerConv, ((4, 5),)),
  (L.TRConv, ((2, 4, 12, 24),)),  # full TR ranks for (S=8, 3, 3, T=12) from shift 0
  (L.TTConv, ((3, 4, 2),)),
  (L.MTKConv, ((2, 4), (3, 4), (2, 3, 4))),
  (L.MTTConv, ((2, 4), (3, 4), (3, 2))),
]


@pytest.mark.parametrize("cls,hyper", EXACT, ids=ids(EXACT))
def test_exact_rank_kernel_converts_losslessly(cls, hyper):
  src = cls(8, 12, 3, *hyper, use_bias=False, rngs=nnx.Rngs(3), param_dtype=F64)
  kernel = src.kernel()
  bias = jnp.linspace(-1, 1, 12, dtype=F64)
  layer = cls.from_weight(kernel, *hyper, bias=bias, param_dtype=F64)
  np.testing.assert_allclose(layer.kernel(), kernel, atol=1e-11 * float(jnp.max(jnp.abs(kernel))))
  x = jax.random.normal(jax.random.key(2), (2, 6, 6, 8), F64)
  dense = ops.conv(x, kernel) + bias[None, None, None]
  np.testing.assert_allclose(layer(x), dense, atol=1e-10 * float(jnp.max(jnp.abs(dense))))


def test_cp_exact_rank_converts():
  """CP-ALS recovers an exactly rank-3 kernel (generic factors)."""
  src = L.CPConv(8, 12, 3, 3, use_bias=False, rngs=nnx.Rngs(4), param_dtype=F64)
  layer = L.CPConv.from_weight(src.kernel(), 3, param_dtype=F64)
  err = jnp.linalg.norm(layer.kernel() - src.kernel()) / jnp.linalg.norm(src.kernel())
  assert float(err) < 1e-6


@pytest.mark.parametrize("cls,hyper", [(L.SVDDense, (3,)), (L.TTDense, ((2, 4), (3, 4), (3,)))])
def test_dense_exact_rank_converts(cls, hyper):
  src = cls(8, 12, *hyper, use_bias=False, rngs=nnx.Rngs(5), param_dtype=F64)
  layer = cls.from_weight(src.kernel(), *hyper, param_dtype=F64)
  np.testing.assert_allclose(layer.kernel(), src.kernel(), atol=1e-12)


def test_num_params_formulas():
  s, t, d = 8, 12, 3
  r0, r1, r2, r3 = 2, 3, 4, 2
  assert L.TRConv(s, t, d, (r0, r1, r2, r3), rngs=nnx.Rngs(0)).num_params() == (
    r0 * s * r1 + r1 * d * r2 + r2 * d * r3 + r3 * t * r0 + t
  )
  assert L.TTConv(s, t, d, (r1, r2, r3), use_bias=False, rngs=nnx.Rngs(0)).num_params() == (
    s * r1 + r1 * d * r2 + r2 * d * r3 + r3 * t
  )
  assert L.TuckerConv(s, t, d, (4, 5), use_bias=False, rngs=nnx.Rngs(0)).num_params() == (
    s * 4 + d * d * 4 * 5 + 5 * t
  )
  assert L.CPConv(s, t, d, 6, use_bias=False, rngs=nnx.Rngs(0)).num_params() == 6 * (s + 2 * d + t)
  assert (
    L.SVDConv(s, t, d, 5, use_bias=False, rngs=nnx.Rngs(0)).num_params() == d * d * s * 5 + 5 * t
  )
  mtt = L.MTTConv(s, t, d, (2, 4), (3, 4), (3, 2), use_bias=False, rngs=nnx.Rngs(0))
  assert mtt.num_params() == 1 * 2 * 3 * 3 + 3 * 4 * 4 * 2 + 2 * d * d * 1
  ttm = L.TTDense(s, t, (2, 4), (3, 4), (3,), use_bias=False, rngs=nnx.Rngs(0))
  assert ttm.num_params() == 2 * 3 * 3 + 3 * 4 * 4


@pytest.mark.parametrize("cls,hyper", CONV, ids=ids(CONV))
@pytest.mark.parametrize("strides", [1, 2])
def test_macs_match_xla_cost_analysis(cls, hyper, strides):
  """Analytic MACs within 10% of XLA's flop count / 2 (XLA skips padded taps)."""
  layer = cls(8, 12, 3, *hyper, strides=strides, use_bias=False, rngs=nnx.Rngs(0))
  x = jnp.ones((2, 32, 32, 8), jnp.float32)
  graph, state = nnx.split(layer)
  cost = jax.jit(lambda s, x: nnx.merge(graph, s)(x)).lower(state, x).compile().cost_analysis()
  assert cost["flops"] / 2 == pytest.approx(layer.macs(x.shape), rel=0.10)


@pytest.mark.parametrize("cls,hyper", DENSE, ids=ids(DENSE))
def test_dense_macs_match_xla_cost_analysis(cls, hyper):
  """Every factorized dense kind's analytic MACs against XLA's flop count / 2 (as the convs)."""
  layer = cls(64, 96, *_scaled_dense(hyper), use_bias=False, rngs=nnx.Rngs(0))
  x = jnp.ones((16, 64), jnp.float32)
  graph, state = nnx.split(layer)
  cost = jax.jit(lambda s, x: nnx.merge(graph, s)(x)).lower(state, x).compile().cost_analysis()
  assert cost["flops"] / 2 == pytest.approx(layer.macs(x.shape), rel=0.10)


def _scaled_dense(hyper):
  """DENSE's hyper-parameters for 64 -> 96 (modes (8, 8) -> (8, 12)) instead of 8 -> 12."""
  if len(hyper) == 1:
    return (8,)
  return ((8, 8), (8, 12), *hyper[2:])


def test_dense_conv_macs_formula():
  assert ops.conv_macs((2, 32, 32, 8), (3, 3, 8, 12)) == 2 * 32 * 32 * 9 * 8 * 12
  assert ops.conv_macs((1, 9, 9, 8), (3, 3, 8, 12), strides=(2, 2), padding="VALID") == 16 * 9 * 96


def test_random_init_is_variance_preserving():
  """Reconstructed weights of a random layer have about He variance 2 / fan_in."""
  for cls, hyper in CONV[:5]:
    layer = cls(64, 64, 3, *[_scale(h) for h in hyper], rngs=nnx.Rngs(0))
    var = float(jnp.var(layer.kernel()))
    assert 0.5 < var / (2 / (9 * 64)) < 2, cls.__name__


def _scale(h):
  return tuple(2 * r for r in h) if isinstance(h, tuple) else 4 * h


def test_bf16_compute_close_to_f32():
  layer = L.TuckerConv(8, 12, 3, (4, 5), rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 8), jnp.float32)
  y32 = layer(x)
  layer.dtype = jnp.bfloat16
  y16 = layer(x)
  assert y16.dtype == jnp.bfloat16
  np.testing.assert_allclose(y16.astype(jnp.float32), y32, atol=0.05 * float(jnp.max(jnp.abs(y32))))


@pytest.mark.parametrize(
  "make,match",
  [
    (lambda: L.TuckerConv(8, 12, 3, (9, 5), rngs=nnx.Rngs(0)), r"ranks\[0\] \(r_S\)=9 exceeds 8"),
    (lambda: L.TuckerConv(8, 12, 3, (0, 5), rngs=nnx.Rngs(0)), "ranks must be positive"),
    (lambda: L.SVDConv(8, 12, 3, 13, rngs=nnx.Rngs(0)), "rank=13 exceeds 12"),
    (lambda: L.TRConv(8, 12, 3, (2, 3, 4), rngs=nnx.Rngs(0)), "ranks must have 4 entries"),
    (lambda: L.MTTConv(8, 12, 3, (2, 3), (3, 4), (2, 2), rngs=nnx.Rngs(0)), "in_modes=.* not S=8"),
    (lambda: L.SVDConv(8, 12, 3, 2, strides=0, rngs=nnx.Rngs(0)), "strides must be"),
    (lambda: L.SVDConv(8, 12, 3, 2, padding="FULL", rngs=nnx.Rngs(0)), "padding: got 'FULL'"),
    (lambda: L.SVDConv(8, 12, 3, 2), "give rngs="),
  ],
)
def test_bad_layer_arguments(make, match):
  with pytest.raises(ValueError, match=match):
    make()


def test_contract_macs_counts_each_pairwise_step():
  # (n,s)x(s,r): n*s*r, then (n,r)x(r,t): n*r*t
  assert ops.contract_macs("ns,sr,rt->nt", (5, 8), (8, 3), (3, 12)) == 5 * 8 * 3 + 5 * 3 * 12
