"""`tnn.norm`: the written-out BatchNorm gradient against float64 autodiff, and the module
against Flax's `nnx.BatchNorm` (values, running statistics, eval mode, mixed precision)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from tnn import norm, onednn, ops


def _textbook(x, scale, bias, eps):
  """Two-pass training BatchNorm, differentiated by JAX (the reference)."""
  axes = tuple(range(x.ndim - 1))
  mean = jnp.mean(x, axes, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axes, keepdims=True)
  y = (x - mean) * jax.lax.rsqrt(var + eps) * scale.reshape(mean.shape) + bias.reshape(mean.shape)
  return y, mean.reshape(-1), var.reshape(-1)


def _data(shape, seed=0, loc=0.0, spread=1.0):
  r = np.random.default_rng(seed)
  c = shape[-1]
  x = loc + spread * r.standard_normal(shape)
  scale, bias = r.uniform(0.5, 1.5, c), r.standard_normal(c)
  cts = (r.standard_normal(shape), r.standard_normal(c), r.standard_normal(c))
  return x, scale, bias, cts


def _vjp(fn, x, scale, bias, cts, dtype):
  args = [jnp.asarray(a, dtype) for a in (x, scale, bias)]
  out, vjp = jax.vjp(fn, *args)
  return out, vjp(tuple(jnp.asarray(c, dtype) for c in cts))


@pytest.mark.parametrize("shape", [(4, 6, 5, 3), (16, 7), (2, 3, 3, 3, 2)])
def test_values_and_vjp_of_all_three_outputs_match_float64_autodiff(shape):
  x, scale, bias, cts = _data(shape)
  with jax.enable_x64(True):
    want, want_grads = _vjp(lambda *a: _textbook(*a, 1e-5), x, scale, bias, cts, jnp.float64)
    got, got_grads = _vjp(lambda *a: norm.batch_norm(*a, 1e-5), x, scale, bias, cts, jnp.float64)
    for a, b in zip((*got, *got_grads), (*want, *want_grads), strict=True):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-10, atol=1e-10)
  # float32 against the float64 reference
  got, got_grads = _vjp(lambda *a: norm.batch_norm(*a, 1e-5), x, scale, bias, cts, jnp.float32)
  for a, b in zip((*got, *got_grads), (*want, *want_grads), strict=True):
    assert a.dtype == jnp.float32
    scale_ = float(np.max(np.abs(np.asarray(b))))
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b), atol=2e-5 * scale_)


def test_a_channel_whose_mean_dwarfs_its_spread():
  """Why the variance is two-pass: mean 300, spread 0.05. The one-pass `E[x^2] - E[x]^2`
  loses every digit of the variance in float32; ours keeps the gradient within 1e-3 of
  float64. A rule fed the one-pass variance fails the same check."""
  x, scale, bias, cts = _data((8, 6, 6, 4), seed=1, loc=300.0, spread=0.05)
  with jax.enable_x64(True):
    _, want = _vjp(
      lambda *a: _textbook(*a, 1e-5), x, scale, bias, cts[:1] + (0 * cts[1],) * 2, jnp.float64
    )
    want = np.asarray(want[0])
  cts0 = (cts[0], np.zeros(4), np.zeros(4))
  _, got = _vjp(lambda *a: norm.batch_norm(*a, 1e-5), x, scale, bias, cts0, jnp.float32)
  err = np.linalg.norm(np.asarray(got[0], np.float64) - want) / np.linalg.norm(want)
  assert err < 1e-3

  xf = jnp.asarray(x, jnp.float32)
  m = jnp.mean(xf, (0, 1, 2))
  fast = jnp.maximum(jnp.mean(xf * xf, (0, 1, 2)) - m * m, 0.0)  # Flax's use_fast_variance
  true = np.var(x.reshape(-1, 4), axis=0)
  assert np.max(np.abs(np.asarray(fast) - true) / true) > 0.5  # the one-pass estimate


def _pair(c, **kw):
  ours = norm.BatchNorm(c, momentum=0.9, epsilon=1e-5, rngs=nnx.Rngs(0), **kw)
  flax = nnx.BatchNorm(c, momentum=0.9, epsilon=1e-5, rngs=nnx.Rngs(0), **kw)
  r = np.random.default_rng(2)
  for m in (ours, flax):
    m.scale[...] = jnp.asarray(r.uniform(0.5, 1.5, c), jnp.float32)
    m.bias[...] = jnp.asarray(r.standard_normal(c), jnp.float32)
    r = np.random.default_rng(2)
  return ours, flax


def _state_and_loss(model):
  """The module's state and `loss(state, x)`: the sum of `sin` of its training output."""
  g, st = nnx.split(model)

  def loss(st, x):
    m = nnx.merge(g, st)
    m.train()
    return jnp.sum(jnp.sin(m(x)))

  return st, loss


def test_module_matches_nnx_batchnorm_in_train_and_eval_mode():
  with jax.enable_x64(False):
    ours, flax = _pair(5)
    x = jnp.asarray(np.random.default_rng(3).standard_normal((6, 4, 4, 5)) * 2 + 1, jnp.float32)
    for _ in range(2):  # two updates of the running statistics
      y0, y1 = ours(x, use_running_average=False), flax(x, use_running_average=False)
      np.testing.assert_allclose(np.asarray(y0), np.asarray(y1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ours.mean[...]), np.asarray(flax.mean[...]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(ours.var[...]), np.asarray(flax.var[...]), rtol=1e-5)
    assert not np.allclose(np.asarray(ours.var[...]), 1.0)  # they moved
    ours.eval()
    flax.eval()
    # Flax's own code, on running statistics equal to rounding
    np.testing.assert_allclose(np.asarray(ours(x)), np.asarray(flax(x)), rtol=1e-5, atol=1e-5)

    # and the gradients of a loss through the module, parameters included
    def loss(model, x):
      model.train()
      return jnp.sum(jnp.sin(model(x)))

    g0 = nnx.grad(loss, argnums=(0, 1))(ours, x)
    g1 = nnx.grad(loss, argnums=(0, 1))(flax, x)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1), strict=True):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_mixed_precision_output_dtype_and_float32_statistics():
  ours, flax = _pair(4, dtype=jnp.bfloat16)
  x = jnp.asarray(np.random.default_rng(4).standard_normal((8, 3, 3, 4)), jnp.bfloat16)
  with jax.numpy_dtype_promotion("standard"):  # as the train steps run (Flax's code needs it)
    y0, y1 = ours(x, use_running_average=False), flax(x, use_running_average=False)
  assert y0.dtype == y1.dtype == jnp.bfloat16
  assert ours.mean[...].dtype == jnp.float32
  np.testing.assert_allclose(
    np.asarray(y0, np.float32), np.asarray(y1, np.float32), rtol=2e-2, atol=2e-2
  )


def test_bad_shapes_are_refused():
  x = jnp.zeros((2, 3, 3, 4))
  with pytest.raises(ValueError, match=r"scale must have shape \(4,\), got \(3,\)"):
    norm.batch_norm(x, jnp.ones(3), jnp.zeros(4), 1e-5)
  with pytest.raises(ValueError, match="batch and a channel axis"):
    norm.batch_norm(jnp.zeros(4), jnp.ones(4), jnp.zeros(4), 1e-5)


def test_off_the_cpu_the_module_runs_flax_formula():
  """Lowered for a GPU or TPU, `train_batch_norm` is Flax's formula (the branch below),
  which equals `nnx.BatchNorm`'s training output and gradients on the same input; the
  module exports for cuda and tpu."""
  with jax.enable_x64(False):
    _, flax = _pair(5)
    x = jnp.asarray(np.random.default_rng(5).standard_normal((6, 4, 4, 5)) * 3 + 2, jnp.float32)
    scale, bias = flax.scale[...], flax.bias[...]

    def ours(x, s, b):
      return norm._flax_formula(x, s, b, 1e-5, True)

    def theirs(x, s, b):
      m = nnx.clone(flax)
      m.scale[...], m.bias[...] = s, b
      return m(x, use_running_average=False)

    y, vjp = jax.vjp(lambda *a: ours(*a)[0], x, scale, bias)
    y1, vjp1 = jax.vjp(theirs, x, scale, bias)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y1), rtol=1e-6, atol=1e-6)
    ct = jnp.cos(y1)
    for a, b in zip(vjp(ct), vjp1(ct), strict=True):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)

    st, loss = _state_and_loss(_pair(5)[0])
    for platform in ("cuda", "tpu"):
      exp = jax.export.export(jax.jit(jax.grad(loss, (0, 1))), platforms=(platform,))(st, x)
      assert exp.platforms == (platform,)


# --- the reductions by tensorial's CPU kernels (`native`, under conv_backend("onednn")) --

_OK, _WHY = onednn.available()
needs_kernels = pytest.mark.skipif(not _OK, reason=f"CPU kernels not available: {_WHY}")


@needs_kernels
@pytest.mark.parametrize(
  "shape,loc,spread",
  [
    ((2, 3, 4, 5), 0.0, 1.0),  # 24 rows: one slice on the calling thread
    ((8, 16, 16, 16), 0.0, 1.0),  # 2048 rows: slices on XLA's threads
    ((8, 16, 16, 4), 300.0, 0.05),  # the mean dwarfs the spread
  ],
)
def test_native_reductions_match_float64_autodiff(shape, loc, spread):
  """`native=True`: the statistics from one pass of shifted sums and the backward's two
  sums from one pass of `dy` and `x`, against the float64 textbook, values and the VJP of
  all three outputs."""
  x, scale, bias, cts = _data(shape, seed=6, loc=loc, spread=spread)
  with jax.enable_x64(True):
    want = _vjp(lambda *a: _textbook(*a, 1e-5), x, scale, bias, cts, jnp.float64)
    want = [np.asarray(a) for a in (*want[0], *want[1])]
  fn = jax.jit(lambda *a: norm.batch_norm(*a, 1e-5, native=True))
  got = _vjp(fn, x, scale, bias, cts, jnp.float32)
  for a, b in zip((*got[0], *got[1]), want, strict=True):
    assert a.dtype == jnp.float32
    err = np.linalg.norm(np.asarray(a, np.float64) - b) / max(np.linalg.norm(b), 1e-30)
    assert err < (1e-3 if loc else 2e-6), err


@needs_kernels
def test_native_reductions_run_the_custom_calls_and_equal_xla_ones():
  """Under conv_backend("onednn") the module's CPU program calls the two reductions
  (`tensorial_bn_sums`, `tensorial_bn_grad_sums`), and its output and gradients equal the
  XLA reductions' (conv_backend("xla")) to float32 rounding."""
  x = jnp.asarray(np.random.default_rng(7).standard_normal((4, 8, 8, 6)) * 2 + 1, jnp.float32)
  with jax.enable_x64(False):
    st, loss = _state_and_loss(_pair(6)[0])
    out = {}
    for backend in ("xla", "onednn"):
      with ops.conv_backend(backend):
        f = jax.jit(jax.value_and_grad(loss, (0, 1)))
        hlo = f.lower(st, x).as_text()
        out[backend] = jax.tree.leaves(f(st, x))
      assert ("tensorial_bn_sums" in hlo) == (backend == "onednn")
      assert ("tensorial_bn_grad_sums" in hlo) == (backend == "onednn")
    for a, b in zip(out["onednn"], out["xla"], strict=True):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-5)
    with ops.conv_backend("onednn"):  # lowered for a GPU or TPU: no custom call
      for platform in ("cuda", "tpu"):
        exp = jax.export.export(jax.jit(jax.grad(loss)), platforms=(platform,))(st, x)
        assert "tensorial_bn" not in exp.mlir_module()


@needs_kernels
def test_native_sums_batch_partitioned_over_two_devices():
  """Batch-split over two devices: each device sums its rows, the sums are added across
  devices (no gather of the activations): the same numbers as on one device."""
  if jax.device_count() < 2:
    pytest.skip("needs two devices (conftest forces two CPU devices)")
  mesh = jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  r = np.random.default_rng(8)
  x, dy = (jnp.asarray(r.standard_normal((8, 6, 6, 4)), jnp.float32) for _ in range(2))
  k = jnp.asarray(r.standard_normal(4), jnp.float32)
  f = jax.jit(lambda dy, x, k: (*onednn.batch_sums(x, k), *onednn.batch_grad_sums(dy, x, k)))
  want = f(dy, x, k)
  split = NamedSharding(mesh, P("data"))
  got = f(jax.device_put(dy, split), jax.device_put(x, split), k)
  x64, dy64, k64 = (np.asarray(a, np.float64) for a in (x, dy, k))
  exact = ((x64 - k64).sum((0, 1, 2)), ((x64 - k64) ** 2).sum((0, 1, 2)))
  exact += (dy64.sum((0, 1, 2)), (dy64 * (x64 - k64)).sum((0, 1, 2)))
  for a, b, e in zip(got, want, exact, strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(a), e, rtol=1e-5, atol=1e-4)
  hlo = f.lower(jax.device_put(dy, split), jax.device_put(x, split), k).compile().as_text()
  assert "all-gather" not in hlo


@needs_kernels
def test_native_sums_refuse_bad_arrays():
  x = jnp.zeros((2, 3, 3, 4), jnp.float32)
  with pytest.raises(ValueError, match=r"per-channel vector must be float32 \(4,\)"):
    onednn.batch_sums(x, jnp.zeros(3, jnp.float32))
  with pytest.raises(ValueError, match="4-D float32"):
    onednn.batch_sums(jnp.zeros((6, 4), jnp.float32), jnp.zeros(4, jnp.float32))
  with pytest.raises(ValueError, match="shapes differ"):
    onednn.batch_grad_sums(jnp.zeros((2, 3, 3, 4), jnp.float32), x[:1], jnp.zeros(4, jnp.float32))
