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
(tests/test_norm.py: mean 300, spread 0.05). (A random ResNet-20's float32 gradient is no
evidence either way: with ReLU it jumps by up to 1e-3 normwise as rounding moves a
pre-activation across 0, tests/test_onednn.py.) So values equal
`nnx.BatchNorm`'s to rounding, not bit for bit, and the running variance is the more
accurate one. The backward reads `x` again (it keeps `x`, not `xhat`, as its residual: one
activation-sized buffer, as autodiff keeps).

Under `tnn.ops.conv_backend("onednn")` (the train steps' `cpu_conv="onednn"`) the
reductions of a 4-D float32 `x` run as tensorial's CPU kernels (`tnn.onednn.batch_sums`,
`batch_grad_sums`), one pass each: the statistics from sums of `x - k` and `(x - k)^2` with
`k = x[0, 0, 0]`, one of the batch's own values a channel, so that the subtraction
`E[(x - k)^2] - E[x - k]^2` cancels no more than the spread of the batch (the mean-300
channel passes the same float64 check); the backward's `sum(dy)` and
`sum(dy * (x - mean))`, the latter times `rsqrt(var + eps)` being `dscale`. XLA's own
reductions materialize `x - mean` and `xhat` for their YNNPACK reductions; the ResNet-32
train step at batch 32 spent 15 ms in those reductions and 8 ms writing the two
intermediates, against 7.7 ms in the kernels (`benchmarks/step_profile.py`, 99.5 -> 87.9
ms a step). Elsewhere (`conv_backend("xla")`, other dtypes or ranks) XLA's reductions.

`BatchNorm` takes this path where its program is lowered for the CPU
(`lax.platform_dependent`); lowered for a GPU or TPU it runs Flax's formula, differentiated
by JAX, as `nnx.BatchNorm` does (not measured there: no GPU has been lent to this project).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from tnn import onednn, ops


def batch_norm(
  x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float, native: bool = False
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Training-mode BatchNorm over every axis but the last: `(y, mean, var)`.

  `y = (x - mean) * rsqrt(var + epsilon) * scale + bias` with the batch's biased `var`.
  `y` has `x`'s dtype; the statistics are computed in float32 (float64 for float64 `x`)
  and returned in it. `native`: the reductions of a 4-D float32 `x` by tensorial's CPU
  kernels (`tnn.onednn.batch_sums`, `batch_grad_sums`; a program lowered for the CPU only).
  """
  if x.ndim < 2:
    raise ValueError(f"batch_norm: x must have a batch and a channel axis, got shape {x.shape}.")
  c = x.shape[-1]
  for name, v in (("scale", scale), ("bias", bias)):
    if v.shape != (c,):
      raise ValueError(f"batch_norm: {name} must have shape ({c},), got {v.shape}.")
  return _batch_norm(x, scale, bias, float(epsilon), bool(native) and _native(x))


def _row(v, ndim):
  """A per-channel vector shaped to broadcast over an `ndim`-d channels-last array."""
  return v.reshape((1,) * (ndim - 1) + (-1,))


def _stats_dtype(x):
  return jnp.float64 if x.dtype == jnp.float64 else jnp.float32


def _native(x) -> bool:
  """Whether tensorial's CPU kernels compute the reductions (see the module docstring)."""
  return x.ndim == 4 and x.dtype == jnp.float32


def _statistics(xf, native):
  """The batch's per-channel mean and biased variance of `xf` (float32 or float64)."""
  axes = tuple(range(xf.ndim - 1))
  if native:
    k = xf[0, 0, 0]  # one of the batch's own values a channel: the sums' shift
    s1, s2 = onednn.batch_sums(xf, k)
    n = xf.size // xf.shape[-1]
    d = s1 / n
    return k + d, jnp.maximum(s2 / n - d * d, 0.0)
  mean = jnp.mean(xf, axes)
  return mean, jnp.mean(jnp.square(xf - _row(mean, xf.ndim)), axes)


def _forward(x, scale, bias, epsilon, native):
  """`_batch_norm`'s forward rule (`y = x a + c`, one multiply-add an element)."""
  xf = x.astype(_stats_dtype(x))
  mean, var = _statistics(xf, native)
  inv = jax.lax.rsqrt(var + epsilon)
  a = scale.astype(xf.dtype) * inv
  c = bias.astype(xf.dtype) - mean * a
  y = (xf * _row(a, x.ndim) + _row(c, x.ndim)).astype(x.dtype)
  return (y, mean, var), (x, mean, inv, scale, bias)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _batch_norm(x, scale, bias, epsilon, native):
  return _forward(x, scale, bias, epsilon, native)[0]


def _bwd(epsilon, native, res, cts):
  x, mean, inv, scale, bias = res
  dy, dmean, dvar = cts
  axes = tuple(range(x.ndim - 1))
  n = x.size // x.shape[-1]
  xf = x.astype(mean.dtype)
  dyf = dy.astype(mean.dtype)
  nd = x.ndim
  xhat = (xf - _row(mean, nd)) * _row(inv, nd)
  if native:
    dbias, dscale = onednn.batch_grad_sums(dyf, xf, mean)
    dscale = dscale * inv
  else:
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
  native = ops.current_conv_backend() == "onednn"
  return lax.platform_dependent(
    x,
    scale,
    bias,
    cpu=lambda x, s, b: batch_norm(x, s, b, eps, native),
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
