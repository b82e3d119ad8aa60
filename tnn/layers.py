"""Factorized conv and dense layers: thin Flax NNX modules over `tnn.functional`.

Every layer holds its factors as `nnx.Param`s (names from its kind) and has two forward
paths: the factorized pipeline (`factorized(x)`) and one dense conv/matmul through its
reconstructed weight (`reconstructed(x)`, the oracle of the tests). `__call__` runs the
one named by the layer's static `forward` (default `"factorized"`). Built either
randomly (variance-preserving, for training from scratch) or from a dense weight
(`from_weight`, through `decomp`); `num_params()` counts exactly the numbers stored
and `macs(input_shape)` the multiply-adds of the factorized forward.

Conv layers take NHWC input, HWIO weights `(d_h, d_w, S, T)`; dense layers `(N, S)` and
`(S, T)`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tnn import functional as F
from tnn import ops

__all__ = [
  "FORWARDS",
  "CPConv",
  "CPDense",
  "Factorized",
  "FactorizedConv",
  "FactorizedDense",
  "MCPConv",
  "MTKConv",
  "MTRConv",
  "MTTConv",
  "SVDConv",
  "SVDDense",
  "TRConv",
  "TRDense",
  "TTConv",
  "TTDense",
  "TuckerConv",
  "TuckerDense",
  "check_at_most",
  "check_ranks",
]


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _normal(key, shapes: tuple, std: float, dtype) -> tuple:
  """All factors of one layer from one normal draw, in one compiled call (eager init
  compiles per op, and XLA CPU compiles several threefry draws slowly)."""
  sizes = [math.prod(s) for s in shapes]
  flat = std * jax.random.normal(key, (sum(sizes),), dtype)
  ends = np.cumsum(sizes)
  return tuple(flat[e - n : e].reshape(s) for e, n, s in zip(ends, sizes, shapes, strict=True))


def _pair(v, name: str) -> tuple:
  v = (v, v) if isinstance(v, int) else tuple(v)
  if len(v) != 2 or any(not isinstance(a, int) or a < 1 for a in v):
    raise ValueError(f"{name} must be a positive int or a pair of them, got {v!r}.")
  return v


def check_ranks(ranks, name: str, n: int | None = None) -> tuple:
  """`ranks` as a tuple of `n` positive ints, or a `ValueError` naming `name`."""
  ranks = (ranks,) if isinstance(ranks, int) else tuple(ranks)
  if n is not None and len(ranks) != n:
    raise ValueError(f"{name} must have {n} entries, got {ranks!r}.")
  if any(not isinstance(r, int) or r < 1 for r in ranks):
    raise ValueError(f"{name} must be positive ints, got {ranks!r}; allowed range [1, ...].")
  return ranks


def check_at_most(value: int, hi: int, name: str) -> None:
  """A `ValueError` naming `name` when `value > hi` (the allowed range is [1, hi])."""
  if value > hi:
    raise ValueError(f"{name}={value} exceeds {hi}; allowed range [1, {hi}].")


FORWARDS = ("factorized", "reconstructed")
"""The values of a layer's `forward`: which of its two paths `__call__` runs."""


class Factorized(nnx.Module):
  """A layer whose weight is stored as factors of kind `self.kind` (`tnn.functional`).

  Attributes:
    weight_shape: the dense weight's shape: HWIO for a conv, `(S, T)` for a dense layer.
    hyper: the kind's static hyper-parameters (ranks, mode factorizations).
    names: the factor params' names.
    bias: `nnx.Param (T,)` or None.
    forward: `"factorized"` (the method's pipeline, the one `macs` counts) or
      `"reconstructed"` (the weight rebuilt from the factors, then one conv or matmul).
      Both are the same function of the input and the factors, so values and gradients
      agree to rounding (tested); the choice is speed only. The reconstructed path wins
      where the pipeline's contractions are too small or too oddly shaped for the
      backend: on XLA's CPU backend the m-form convs train several times faster through it
      (the README's m-form measurement), although the pipeline has fewer multiply-adds.
  """

  kind: F.Kind
  conv: bool = True

  def __init__(
    self,
    weight_shape: Sequence[int],
    hyper,
    *,
    strides=1,
    padding="SAME",
    use_bias: bool = True,
    params: dict | None = None,
    bias: jax.Array | None = None,
    dtype=None,
    param_dtype=jnp.float32,
    forward: str = "factorized",
    rngs: nnx.Rngs | None = None,
  ):
    if forward not in FORWARDS:
      raise ValueError(f"{type(self).__name__}: forward {forward!r}; allowed {FORWARDS}.")
    self.forward = forward
    self.weight_shape = tuple(int(d) for d in weight_shape)
    self.hyper = hyper
    self.strides = _pair(strides, "strides") if self.conv else (1, 1)
    if self.conv:
      ops.pads((8, 8), (1, 1), (1, 1), padding)  # validates the padding argument
    self.padding = padding if isinstance(padding, str) else tuple(tuple(p) for p in padding)
    self.dtype = dtype
    shapes = self.kind.shapes(self.weight_shape, hyper)
    self.names = tuple(shapes)
    if params is None:
      if rngs is None:
        raise ValueError(f"{type(self).__name__}: give rngs= (random init) or params=.")
      params = self._random(shapes, rngs, param_dtype)
    for name, shape in shapes.items():
      if tuple(params[name].shape) != tuple(shape):
        raise ValueError(
          f"{type(self).__name__}: factor {name!r} has shape {tuple(params[name].shape)}, "
          f"expected {tuple(shape)}."
        )
      value = params[name]
      if value.dtype != param_dtype:
        value = value.astype(param_dtype)
      setattr(self, name, nnx.Param(value))
    t = self.weight_shape[-1]
    if bias is not None:
      self.bias = nnx.Param(jnp.asarray(bias, param_dtype).reshape(t))
    elif use_bias:
      self.bias = nnx.Param(jnp.asarray(np.zeros((t,), param_dtype)))
    else:
      self.bias = None

  def _random(self, shapes: dict, rngs: nnx.Rngs, dtype) -> dict:
    """Factors whose reconstructed weight has He variance `2 / fan_in`.

    A weight entry sums `terms` products of `K` independent zero-mean factor entries,
    so each factor gets variance `(2 / fan_in / terms) ** (1 / K)`; the Tucker core and
    the CP weights are factors like the others.
    """
    fan_in = math.prod(self.weight_shape[:-1])
    var = (2.0 / fan_in / self.kind.terms(self.hyper)) ** (1.0 / len(shapes))
    arrays = _normal(rngs.params(), tuple(shapes.values()), math.sqrt(var), jnp.dtype(dtype))
    return dict(zip(shapes, arrays, strict=True))

  # --- the two forward paths ---

  def factors(self) -> dict:
    return {name: getattr(self, name)[...] for name in self.names}

  def kernel(self) -> jax.Array:
    """The dense weight the factors represent (HWIO, or `(S, T)`)."""
    return self.kind.kernel(self.factors(), self.weight_shape, self.hyper)

  def _cast(self, x, p):
    if self.dtype is None:
      return x, p
    return x.astype(self.dtype), jax.tree.map(lambda a: a.astype(self.dtype), p)

  def _add_bias(self, y):
    if self.bias is None:
      return y
    return y + self.bias[...].astype(y.dtype).reshape((1,) * (y.ndim - 1) + (-1,))

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.factorized(x) if self.forward == "factorized" else self.reconstructed(x)

  def factorized(self, x: jax.Array) -> jax.Array:
    """The layer through its factorized pipeline (`self.kind.apply`)."""
    x, p = self._cast(x, self.factors())
    return self._add_bias(self.kind.apply(x, p, self.hyper, self.strides, self.padding))

  def reconstructed(self, x: jax.Array) -> jax.Array:
    """The same layer through its reconstructed weight (one conv or matmul)."""
    x, (w,) = self._cast(x, (self.kernel(),))
    if self.conv:
      y = ops.conv(x, w, strides=self.strides, padding=self.padding)
    else:
      y = ops.contract("ns,st->nt", x, w)
    return self._add_bias(y)

  # --- accounting ---

  def num_params(self) -> int:
    n = sum(math.prod(getattr(self, k).shape) for k in self.names)
    return n + (0 if self.bias is None else self.weight_shape[-1])

  def macs(self, input_shape: Sequence[int]) -> int:
    """Multiply-adds of the factorized forward for an input of this shape (bias excluded),
    whichever path `forward` names: the method's cost, not the training shortcut's."""
    return self.kind.macs(
      tuple(input_shape), self.weight_shape, self.hyper, self.strides, self.padding
    )

  @classmethod
  def from_weight(cls, weight, *args, bias=None, **kwargs):
    """The layer initialised from the decomposition of a dense weight.

    `args` are the class's hyper-parameters after the shape arguments (e.g. `ranks`);
    `kwargs` the layer's options (strides, padding, dtype...).
    """
    weight = jnp.asarray(weight)
    shape_args = (weight.shape[-2], weight.shape[-1]) + ((weight.shape[:2],) if cls.conv else ())
    hyper = cls.check_hyper(*shape_args, *args)
    params = cls.kind.decompose(weight, hyper)
    return cls(*shape_args, *args, params=params, bias=bias, use_bias=bias is not None, **kwargs)


class FactorizedConv(Factorized):
  """Signature shared by conv layers: `(in_features, out_features, kernel_size, *hyper)`."""

  def __init__(self, in_features: int, out_features: int, kernel_size, *hyper_args, **kwargs):
    kernel_size = _pair(kernel_size, "kernel_size")
    hyper = self.check_hyper(in_features, out_features, kernel_size, *hyper_args)
    super().__init__((*kernel_size, in_features, out_features), hyper, **kwargs)


class SVDConv(FactorizedConv):
  """Lowered SVD (DeepTwist): `d x d` conv `S -> rank`, then 1x1 `rank -> T`."""

  kind = F.SVD

  @classmethod
  def check_hyper(cls, s, t, k, rank):
    (rank,) = check_ranks(rank, "rank", 1)
    check_at_most(rank, min(t, s * k[0] * k[1]), "rank")
    return rank


class TuckerConv(FactorizedConv):
  """Tucker-2: 1x1 `S -> r_S`, `d x d` `r_S -> r_T`, 1x1 `r_T -> T`; `ranks=(r_S, r_T)`."""

  kind = F.TUCKER

  @classmethod
  def check_hyper(cls, s, t, k, ranks):
    ranks = check_ranks(ranks, "ranks", 2)
    check_at_most(ranks[0], s, "ranks[0] (r_S)")
    check_at_most(ranks[1], t, "ranks[1] (r_T)")
    return ranks


class CPConv(FactorizedConv):
  """Rank-R CP: 1x1 `S -> R`, depthwise `d x 1`, depthwise `1 x d`, 1x1 `R -> T`."""

  kind = F.CP

  @classmethod
  def check_hyper(cls, s, t, k, rank):
    (rank,) = check_ranks(rank, "rank", 1)
    return rank


class TRConv(FactorizedConv):
  """RSDTR's tensor-ring conv; `ranks=(R0, R1, R2, R3)`, cores in ring order (S, d_h, d_w, T).

  Storage `R0 S R1 + R1 d_h R2 + R2 d_w R3 + R3 T R0` (+ bias).
  """

  kind = F.TR

  @classmethod
  def check_hyper(cls, s, t, k, ranks):
    return check_ranks(ranks, "ranks", 4)


class TTConv(TRConv):
  """Tensor-train conv: the TR pipeline with `R0 = 1`; `ranks=(R1, R2, R3)`."""

  kind = F.TT

  @classmethod
  def check_hyper(cls, s, t, k, ranks):
    return (1, *check_ranks(ranks, "ranks", 3))


def _m_hyper(s, t, in_modes, out_modes, ranks, form, conv) -> F.MHyper:
  in_modes = check_ranks(in_modes, "in_modes")
  out_modes = check_ranks(out_modes, "out_modes", len(in_modes))
  if math.prod(in_modes) != s:
    raise ValueError(f"in_modes={in_modes} multiply to {math.prod(in_modes)}, not S={s}.")
  if math.prod(out_modes) != t:
    raise ValueError(f"out_modes={out_modes} multiply to {math.prod(out_modes)}, not T={t}.")
  m = len(in_modes)
  if form == "cp":
    ranks = check_ranks(ranks, "ranks", 1)[0]
  elif form == "tk":
    ranks = check_ranks(ranks, "ranks", m + conv)
  elif form == "tt":
    inner = check_ranks(ranks, "ranks", m + conv - 1)
    ranks = (1, *inner)
  else:
    ranks = check_ranks(ranks, "ranks", m + conv)
  return F.MHyper(in_modes, out_modes, ranks)


class _MForm:
  """TNN m-form hyper-parameters: `(..., in_modes, out_modes, ranks)` after the shapes
  (a conv's kernel size is not needed: the spatial mode is not reshaped)."""

  form = ""
  conv = True

  @classmethod
  def check_hyper(cls, s, t, *args):
    in_modes, out_modes, ranks = args[-3:]
    return _m_hyper(s, t, in_modes, out_modes, ranks, cls.form, cls.conv)


class _MConv(_MForm, FactorizedConv):
  """TNN m-form conv: `(in_features, out_features, kernel_size, in_modes, out_modes, ranks)`."""


class MCPConv(_MConv):
  """mCP: CP of `W (s_1 t_1, ..., s_m t_m, d_h d_w)`; `ranks` one int."""

  kind, form = F.MCP, "cp"


class MTKConv(_MConv):
  """mTK: Tucker of `W (s_1 t_1, ..., s_m t_m, d_h d_w)`; `ranks=(r_1..r_m, r_sp)`."""

  kind, form = F.MTK, "tk"


class MTTConv(_MConv):
  """mTT: TT of `W (s_1 t_1, ..., s_m t_m, d_h d_w)`; `ranks=(R_1..R_m)`."""

  kind, form = F.MTT, "tt"


class MTRConv(_MConv):
  """mTR: TR of `W (s_1 t_1, ..., s_m t_m, d_h d_w)`; `ranks=(R_0..R_m)`."""

  kind, form = F.MTR, "tr"


class FactorizedDense(Factorized):
  conv = False

  def __init__(self, in_features: int, out_features: int, *hyper_args, **kwargs):
    hyper = self.check_hyper(in_features, out_features, *hyper_args)
    super().__init__((in_features, out_features), hyper, **kwargs)


def _dense_svd_kind() -> F.Kind:
  def shapes(ws, r):
    return {"u": (ws[0], r), "v": (r, ws[1])}

  def kernel(p, ws, r):
    return jnp.matmul(p["u"], p["v"], precision=jax.lax.Precision.HIGHEST)

  def apply(x, p, r, strides, padding):
    return ops.contract("ns,sr,rt->nt", x, p["u"], p["v"])

  def macs(xs, ws, r, strides, padding):
    return ops.contract_macs("ns,sr,rt->nt", xs, (ws[0], r), (r, ws[1]))

  def decompose(w, r):
    f = F.decomp.lowered_svd(w[None, None], r)  # a 1x1 kernel's lowered matrix is w^T
    return {"u": f.u[0, 0], "v": f.v}

  return F.Kind("dense_svd", shapes, kernel, apply, macs, decompose, lambda r: r)


class SVDDense(FactorizedDense):
  """`x W` with `W = u v`, `u (S, rank)`, `v (rank, T)`."""

  kind = _dense_svd_kind()

  @classmethod
  def check_hyper(cls, s, t, rank):
    (rank,) = check_ranks(rank, "rank", 1)
    check_at_most(rank, min(s, t), "rank")
    return rank


class _MDense(_MForm, FactorizedDense):
  """Dense layer over `W (s_1 t_1, ..., s_m t_m)`: `(in, out, in_modes, out_modes, ranks)`."""

  conv = False


class CPDense(_MDense):
  """CP of the reshaped weight; `ranks` one int."""

  kind, form = F.DENSE_CP, "cp"


class TuckerDense(_MDense):
  """Tucker of the reshaped weight; `ranks=(r_1..r_m)`."""

  kind, form = F.DENSE_TK, "tk"


class TTDense(_MDense):
  """TT-matrix (Novikov et al. 2015); cores `(R_{k-1}, s_k, t_k, R_k)`; `ranks=(R_1..R_{m-1})`."""

  kind, form = F.DENSE_TT, "tt"


class TRDense(_MDense):
  """TR-matrix: the TT-matrix ring closed through `R_0`; `ranks=(R_0..R_{m-1})`."""

  kind, form = F.DENSE_TR, "tr"
