"""`tnn.norm`: the written-out BatchNorm gradient against float64 autodiff, and the module
against Flax's `nnx.BatchNorm` (values, running statistics, eval mode, mixed precision)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tnn import norm


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

    model, _ = _pair(5)
    g, st = nnx.split(model)

    def loss(st, x):
      m = nnx.merge(g, st)
      m.train()
      return jnp.sum(jnp.sin(m(x)))

    for platform in ("cuda", "tpu"):
      exp = jax.export.export(jax.jit(jax.grad(loss, (0, 1))), platforms=(platform,))(st, x)
      assert exp.platforms == (platform,)
