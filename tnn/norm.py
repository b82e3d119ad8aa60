"""BatchNorm whose training-mode gradient is written out rather than traced.

Flax's `nnx.BatchNorm` in training mode is differentiated by JAX through its batch
statistics: the mean, `E[x^2]`, the variance clip, the rsqrt and the normalisation each
get a transpose, which XLA's CPU backend runs as several passes over the activation. Written
out, the backward is two reductions and one elementwise pass. Measured on the 2-core CPU of
`benchmarks/` (float32): a (128, 32, 32, 16) BatchNorm + ReLU forward and backward 3.2-4.1 ms
against 3.9-4.3 ms for Flax's formula under autodiff; the ResNet-32 train step (oneDNN
convs; both compiled in one process, timed round-robin) 101.4 against 102.8 ms at batch 32
and 338.8 against 349.6 ms at batch 128: a small win, most of BatchNorm's cost being the
passes over memory that both make.

The closed form is the textbook one (Ioffe & Szegedy 2015, section 3.1), with
`xhat = (x - mean) * rsqrt(var + eps)` and `n` the elements per channel:

    dbias  = sum(dy)                 dscale = sum(dy * xhat)
    dx     = scale * rsqrt(var + eps) * (dy - dbias / n - xhat * dscale / n)

plus the terms of the mean and variance outputs' own cotangents (`dmean / n`,
`dvar * 2 (x - mean) / n`), so that the rule is the exact VJP of all three outputs.

The variance is two-pass, `E[(x - mean)^2]`, in at least float32; Flax's default is
`E[x^2] - E[x]^2` (`use_fast_variance`), one pass fewer. The closed form needs the
accurate one: it assumes `var` is the variance of the `x` it sees, and with the one-pass
estimate a channel whose mean is large against its spread gets a wrong gradient
(tests/test_norm.py: mean 300, spread 0.05). On a random ResNet-20 with oneDNN convs the
gradient was 1.3e-3 normwise from float64 with the one-pass variance and 8.5e-7 two-pass,
but with the two-pass variance and `y` computed as `(x - mean) * mul + bias` instead of
`x a + c` the oneDNN gradient is again 1.3e-3 from the XLA one: that net's comparison flips
on rounding (a discrete event), so it is no evidence either way. So values equal
`nnx.BatchNorm`'s to rounding, not bit for bit, and the running variance is the more
accurate one. The backward reads `x` again (it keeps `x`, not `xhat`, as its residual: one
activation-sized buffer, as autodiff keeps).

`BatchNorm` takes this path where its program is lowered for the CPU
(`lax.platform_dependent`); lowered for a GPU or TPU it runs Flax's formula, differentiated
by JAX, as `nnx.BatchNorm` does (not measured there: no GPU has been lent to this project).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax


def batch_norm(
  x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Training-mode BatchNorm over every axis but the last: `(y, mean, var)`.

  `y = (x - mean) * rsqrt(var + epsilon) * scale + bias` with the batch's biased `var`.
  `y` has `x`'s dtype; the statistics are computed in float32 (float64 for float64 `x`)
  and returned in it.
  """
  if x.ndim < 2:
    raise ValueError(f"batch_norm: x must have a batch and a channel axis, got shape {x.shape}.")
  c = x.shape[-1]
  for name, v in (("scale", scale), ("bias", bias)):
    if v.shape != (c,):
      raise ValueError(f"batch_norm: {name} must have shape ({c},), got {v.shape}.")
  return _batch_norm(x, scale, bias, float(epsilon))


def _row(v, ndim):
  """A per-channel vector shaped to broadcast over an `ndim`-d channels-last array."""
  return v.reshape((1,) * (ndim - 1) + (-1,))


def _stats_dtype(x):
  return jnp.float64 if x.dtype == jnp.float64 else jnp.float32


def _forward(x, scale, bias, epsilon):
  """`_batch_norm`'s forward rule (`y = x a + c`, one multiply-add an element)."""
  axes = tuple(range(x.ndim - 1))
  xf = x.astype(_stats_dtype(x))
  mean = jnp.mean(xf, axes)
  var = jnp.mean(jnp.square(xf - _row(mean, x.ndim)), axes)
  inv = jax.lax.rsqrt(var + epsilon)
  a = scale.astype(xf.dtype) * inv
  c = bias.astype(xf.dtype) - mean * a
  y = (xf * _row(a, x.ndim) + _row(c, x.ndim)).astype(x.dtype)
  return (y, mean, var), (x, mean, inv, scale, bias)


@jax.custom_vjp
def _batch_norm(x, scale, bias, epsilon):
  return _forward(x, scale, bias, epsilon)[0]


def _bwd(res, cts):
  x, mean, inv, scale, bias = res
  dy, dmean, dvar = cts
  axes = tuple(range(x.ndim - 1))
  n = x.size // x.shape[-1]
  xf = x.astype(mean.dtype)
  dyf = dy.astype(mean.dtype)
  nd = x.ndim
  xhat = (xf - _row(mean, nd)) * _row(inv, nd)
  dbias = jnp.sum(dyf, axes)
  dscale = jnp.sum(dyf * xhat, axes)
  a = scale.astype(mean.dtype) * inv
  # the statistics' own cotangents: d mean / dx = 1/n, d var / dx = 2 (x - mean) / n
  dx = _row(a, nd) * (dyf - _row(dbias / n, nd) - xhat * _row(dscale / n, nd))
  dx = dx + _row(dmean / n, nd) + _row((2.0 / n) * dvar, nd) * (xf - _row(mean, nd))
  return (
    dx.astype(x.dtype),
    dscale.astype(scale.dtype),
    dbias.astype(bias.dtype),
    None,
  )


_batch_norm.defvjp(_forward, _bwd)


def _flax_formula(x, scale, bias, epsilon, fast_variance):
  """`(y, mean, var)` as `nnx.BatchNorm`'s training path computes them (statistics in at
  least float32, `E[x^2] - E[x]^2` clipped at 0 if `fast_variance`), for JAX to
  differentiate."""
  axes = tuple(range(x.ndim - 1))
  xf = x.astype(_stats_dtype(x))
  mean = jnp.mean(xf, axes)
  if fast_variance:
    var = jnp.maximum(0.0, jnp.mean(jnp.square(xf), axes) - jnp.square(mean))
  else:
    var = jnp.mean(jnp.square(xf - _row(mean, x.ndim)), axes)
  y = xf - _row(mean, x.ndim)
  mul = lax.rsqrt(var + epsilon) * scale.astype(xf.dtype)
  y = y * _row(mul, x.ndim) + _row(bias.astype(xf.dtype), x.ndim)
  return y.astype(x.dtype), mean, var


def train_batch_norm(x, scale, bias, epsilon: float, fast_variance: bool = True):
  """`BatchNorm`'s training path: `batch_norm` (the closed-form gradient) where lowered for
  the CPU, Flax's formula elsewhere. `(y, mean, var)`."""
  eps = float(epsilon)
  return lax.platform_dependent(
    x,
    scale,
    bias,
    cpu=lambda x, s, b: batch_norm(x, s, b, eps),
    default=lambda x, s, b: _flax_formula(x, s, b, eps, fast_variance),
  )


class BatchNorm(nnx.BatchNorm):
  """`nnx.BatchNorm` (same parameters, statistics and update rule; values to rounding) whose
  training path over the last axis runs `train_batch_norm`: on the CPU `batch_norm` above,
  two-pass variance whatever `use_fast_variance` says (see the module docstring); on a GPU
  or TPU Flax's formula. Anything else (running averages, a mask, a named axis, another
  feature axis, no scale or bias) is Flax's own code."""

  def __call__(self, x, use_running_average=None, *, mask=None):
    use_ra = self.use_running_average if use_running_average is None else use_running_average
    if (
      use_ra is None
      or use_ra
      or mask is not None
      or self.axis_name is not None
      or self.axis not in (-1, x.ndim - 1)
      or self.scale is None
      or self.bias is None
    ):
      return super().__call__(x, use_running_average, mask=mask)
    x, _, _, scale, bias = self.promote_dtype(
      (x, self.mean[...], self.var[...], self.scale[...], self.bias[...]), dtype=self.dtype
    )
    y, mean, var = train_batch_norm(x, scale, bias, self.epsilon, self.use_fast_variance)
    self.mean[...] = jax.lax.stop_gradient(
      self.momentum * self.mean[...] + (1 - self.momentum) * mean
    )
    self.var[...] = jax.lax.stop_gradient(self.momentum * self.var[...] + (1 - self.momentum) * var)
    if self.dtype is not None:
      y = y.astype(self.dtype)
    return y
