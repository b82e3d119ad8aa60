"""Generalized tensor operations (Su et al., "Tensorial Neural Networks", 2022, section 3).

TNN builds every layer from four primitives over tensors whose modes are named:

- contraction over paired modes, `sum_k x[..k..] w[..k..]`: `contract("nhws,sr->nhwr", x, w)`;
- convolution along a pair of (spatial) modes: `conv(x, w, ...)`;
- outer product `x[i] w[j]`: `outer(x, w)`;
- batch (Hadamard) product over modes, `x[..r..] w[..r..]` with `r` kept:
  `contract("nr,kr->nkr", x, w)`.

Mode names are einsum letters; a letter kept in the output and present in both
operands is a batch product, a letter dropped is a contraction. Every op returns the
tensor and has a `*_macs` twin that counts its multiply-adds from shapes alone, so a
layer's cost is the sum over the ops it runs (`tnn.layers` uses them; the tests check
them against XLA's own cost analysis).

Images are NHWC and conv kernels HWIO `(d_h, d_w, C_in / groups, C_out)`, as in Flax.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

Padding = str | Sequence[tuple[int, int]]


def _acc(dtype) -> jnp.dtype | None:
  """The `preferred_element_type` of a contraction: float64 for float64, else None.

  For bf16/f16 we ask for nothing: XLA's GPU and TPU backends (cuDNN, cuBLAS, the MXU)
  accumulate half-precision products in float32 on their own, and a float32 request
  would make every backward conv and matmul take a float32 cotangent (half the speed).
  """
  return jnp.dtype(jnp.float64) if jnp.dtype(dtype) == jnp.float64 else None


def contract(spec: str, *operands: jax.Array, precision=None) -> jax.Array:
  """Einsum over named modes, contracted left to right in the order given.

  The order is explicit (no path search) so that the cost is the one `contract_macs`
  counts and the one a layer's author chose. Half-precision accumulation: see `_acc`.
  """
  inputs, out = spec.split("->")
  names = inputs.split(",")
  if len(names) != len(operands):
    raise ValueError(f"contract: spec {spec!r} names {len(names)} operands, got {len(operands)}.")
  if _conv_backend.get() == "onednn":
    y = _pointwise_conv(names, out, *operands)
    if y is not None:
      return y
  acc = _acc(operands[0].dtype)
  y, y_names = operands[0], names[0]
  for i in range(1, len(operands)):
    rest = "".join(names[i + 1 :]) + out
    keep = "".join(dict.fromkeys(c for c in y_names + names[i] if c in rest))
    y = jnp.einsum(
      f"{y_names},{names[i]}->{keep}",
      y,
      operands[i],
      precision=precision,
      preferred_element_type=acc,
    ).astype(operands[0].dtype)
    y_names = keep
  if y_names != out:
    y = jnp.einsum(f"{y_names}->{out}", y)
  return y


def _pointwise_conv(names, out, *operands):
  """Under `conv_backend("onednn")`, a channel contraction of an image, `"nhws,st->nhwt"`
  (or `"nhws,ts->nhwt"`), float32, as the 1x1 convolution it is: oneDNN runs it on the
  NHWC image as one GEMM, forward and both gradients, where XLA's dot and its gradients
  transpose the image. None for every other contraction."""
  if len(operands) != 2 or len(names) != 2 or len(names[0]) != 4 or len(names[1]) != 2:
    return None
  x, w = operands
  if x.dtype != jnp.float32 or w.dtype != jnp.float32 or len(out) != 4:
    return None
  c, t = names[0][3], out[3]
  if names[0][:3] != out[:3] or len(set(names[0])) != 4 or t in names[0]:
    return None
  if names[1] == c + t:
    k = w
  elif names[1] == t + c:
    k = w.T
  else:
    return None
  return conv_general_dilated(
    x, k[None, None], (1, 1), ((0, 0), (0, 0)), dimension_numbers=("NHWC", "HWIO", "NHWC")
  )


def contract_macs(spec: str, *shapes: Sequence[int]) -> int:
  """Multiply-adds of `contract(spec, ...)` for operands of these shapes."""
  inputs, out = spec.split("->")
  names = inputs.split(",")
  size = {}
  for name, shape in zip(names, shapes, strict=True):
    for c, n in zip(name, shape, strict=True):
      size[c] = n
  total, y_names = 0, names[0]
  for i in range(1, len(names)):
    rest = "".join(names[i + 1 :]) + out
    total += math.prod(size[c] for c in set(y_names + names[i]))
    y_names = "".join(dict.fromkeys(c for c in y_names + names[i] if c in rest))
  return total


def outer(x: jax.Array, w: jax.Array) -> jax.Array:
  """The outer product `x o w`: shape `x.shape + w.shape`."""
  return jnp.multiply(x.reshape(x.shape + (1,) * w.ndim), w)


def pads(
  spatial: Sequence[int], kernel: Sequence[int], strides: Sequence[int], padding: Padding
) -> tuple:
  """Explicit `((lo, hi), ...)` padding of a conv, as `lax` resolves 'SAME'/'VALID'."""
  if isinstance(padding, str):
    if padding not in ("SAME", "VALID"):
      raise ValueError(f"padding: got {padding!r}; allowed 'SAME', 'VALID' or ((lo, hi), ...).")
    return tuple(lax.padtype_to_pads(tuple(spatial), tuple(kernel), tuple(strides), padding))
  return tuple(tuple(p) for p in padding)


CONV_BACKENDS = ("xla", "onednn")
"""Who runs the convolutions of `conv` and of `tnn.models`' `nnx.Conv`s where a program is
lowered for the CPU: XLA's own convolution, or oneDNN's (`tnn.onednn`). Lowered for cuda
or tpu, XLA's in both cases."""

_conv_backend = contextvars.ContextVar("tensorial_conv_backend", default="xla")


@contextlib.contextmanager
def conv_backend(backend: str):
  """Within the block, the convolutions traced (`conv`, `conv_general_dilated`) run
  through `backend` where lowered for the CPU (`CONV_BACKENDS`). A trace-time choice:
  make it inside the function you jit (as the `train` steps do), so that it is part of
  that function, not of whatever jit cache entry happens to exist. `"onednn"` acts where
  the default backend is the CPU: it builds and registers the oneDNN handlers first
  (`tnn.onednn.load`; `RuntimeError` if it cannot). Where the default backend is a GPU or
  TPU it changes nothing: the programs traced are exactly the `"xla"` ones."""
  if backend not in CONV_BACKENDS:
    raise ValueError(f"conv backend: got {backend!r}; allowed {CONV_BACKENDS}.")
  if backend == "onednn":
    if jax.default_backend() == "cpu":
      from tnn import onednn

      onednn.load()
    else:
      backend = "xla"
  token = _conv_backend.set(backend)
  try:
    yield
  finally:
    _conv_backend.reset(token)


def current_conv_backend() -> str:
  """The backend `conv_backend` set for what is being traced now (default `"xla"`)."""
  return _conv_backend.get()


def conv_general_dilated(lhs, rhs, window_strides, padding, **kwargs):
  """`lax.conv_general_dilated`, or `tnn.onednn.conv_general_dilated` inside
  `conv_backend("onednn")`: what `tnn.models` give their `nnx.Conv`s."""
  if _conv_backend.get() == "onednn":
    from tnn import onednn

    return onednn.conv_general_dilated(lhs, rhs, window_strides, padding, **kwargs)
  return lax.conv_general_dilated(lhs, rhs, window_strides, padding, **kwargs)


def out_size(n: int, k: int, stride: int, pad: tuple[int, int]) -> int:
  return (n + pad[0] + pad[1] - k) // stride + 1


def conv(
  x: jax.Array,
  w: jax.Array,
  *,
  strides: Sequence[int] = (1, 1),
  padding: Padding = "SAME",
  groups: int = 1,
  precision=None,
) -> jax.Array:
  """Convolution along the two spatial modes of `x` `(N, H, W, C)` with `w` HWIO.

  `groups > 1` convolves `groups` channel blocks independently (a batch product over
  the group mode): `w` is `(d_h, d_w, C / groups, C_out)`. A `(d, 1)` or `(1, d)`
  kernel is a convolution along one mode only.
  """
  acc = _acc(x.dtype)
  y = conv_general_dilated(
    x,
    w.astype(x.dtype),
    window_strides=tuple(strides),
    padding=pads(x.shape[1:3], w.shape[:2], strides, padding),
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
    feature_group_count=groups,
    precision=precision,
    preferred_element_type=acc,
  )
  return y.astype(x.dtype)


def depthwise_1d(
  x: jax.Array, w: jax.Array, *, axis: int, stride: int = 1, pad: tuple = (0, 0)
) -> jax.Array:
  """Depthwise convolution of `x` `(N, H, W, C)` along one spatial mode (`axis` 1 or 2)
  with `w` `(d, C)`: `y[.., i, .., c] = sum_k x_pad[.., i stride + k, .., c] w[k, c]`.

  The same numbers as a `(d, 1)` or `(1, d)` conv with `C` groups, computed as `d` strided
  slices times a row of `w`: elementwise work that XLA fuses into one loop.
  """
  if axis not in (1, 2):
    raise ValueError(f"depthwise_1d: axis must be 1 (H) or 2 (W), got {axis}.")
  d = w.shape[0]
  widths = [(0, 0)] * 4
  widths[axis] = tuple(pad)
  xp = jnp.pad(x, widths)
  n_out = (xp.shape[axis] - d) // stride + 1
  w = w.astype(x.dtype)
  y = None
  for k in range(d):
    start, limit, step = [0] * 4, list(xp.shape), [1] * 4
    start[axis], limit[axis], step[axis] = k, k + (n_out - 1) * stride + 1, stride
    term = lax.slice(xp, start, limit, step) * w[k].reshape(1, 1, 1, -1)
    y = term if y is None else y + term
  return y


def conv_macs(
  x_shape: Sequence[int],
  w_shape: Sequence[int],
  *,
  strides: Sequence[int] = (1, 1),
  padding: Padding = "SAME",
) -> int:
  """Multiply-adds of `conv` (every output position times the full kernel)."""
  n, h, w, _ = x_shape
  d_h, d_w, c_in_group, c_out = w_shape
  (ph, pw) = pads((h, w), (d_h, d_w), strides, padding)
  h_out = out_size(h, d_h, strides[0], ph)
  w_out = out_size(w, d_w, strides[1], pw)
  return n * h_out * w_out * d_h * d_w * c_in_group * c_out


def conv_out_shape(x_shape, kernel_hw, c_out, *, strides=(1, 1), padding="SAME") -> tuple:
  n, h, w, _ = x_shape
  ph, pw = pads((h, w), kernel_hw, strides, padding)
  return (
    n,
    out_size(h, kernel_hw[0], strides[0], ph),
    out_size(w, kernel_hw[1], strides[1], pw),
    c_out,
  )
