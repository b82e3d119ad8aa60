"""Dense -> factorized under a plan: `decompose` and `distort` (static, jittable,
vmappable, one weight), `compress` (a factorized copy of a model from its dense weights)
and `factorize_random` (the same layers from random factors). What each method does is
its record in `tnn.methods`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from tnn import layers as L
from tnn import methods
from tnn.plan import LayerPlan, Plan, check_plan, layer_paths, set_path, weight

__all__ = ["compress", "decompose", "distort", "factorize_random"]


def decompose(weight: jax.Array, lp: LayerPlan) -> dict:
  """The factor params of the layer `lp` describes, from a dense weight (static ranks)."""
  rec = methods.get_method(lp.method)
  rec.layer_class(weight.ndim == 4)  # a distortion-only method says so
  return rec.decompose_weight(weight, lp)


def distort(weight: jax.Array, lp: LayerPlan) -> jax.Array:
  """`reconstruct(decompose(weight))`: the DeepTwist distortion of one weight."""
  return methods.get_method(lp.method).distort_weight(weight, lp)


def compress(model: nnx.Module, plan: Plan, *, forward: str = "factorized") -> nnx.Module:
  """A copy of `model` whose planned layers are factorized, initialised from the
  decomposition of their dense weights; everything else (BatchNorm statistics included)
  is copied. Same-shape weights with the same plan are decomposed together (`vmap`).
  `forward`: the new layers' path (`tnn.layers.Factorized`; speed only)."""
  _check_forward(forward)
  check_plan(plan, model)
  new = nnx.clone(model)
  layers = layer_paths(new)
  groups: dict = {}
  for p, lp in plan:
    w = weight(layers[p])
    try:
      methods.get_method(lp.method).layer_class(w.ndim == 4)
    except ValueError as e:
      raise ValueError(f"plan[{p!r}]: {e}") from None
    groups.setdefault((tuple(w.shape), lp), []).append(p)
  for (_, lp), paths in groups.items():
    stack = jnp.stack([weight(layers[p]) for p in paths])
    params = jax.vmap(lambda w, lp=lp: decompose(w, lp))(stack)
    for i, p in enumerate(paths):
      m = layers[p]
      bias = None if getattr(m, "bias", None) is None else m.bias[...]
      params_i = {k: v[i] for k, v in params.items()}
      set_path(new, p, _factorized(m, lp, params=params_i, bias=bias, forward=forward))
  return new


def factorize_random(
  model: nnx.Module, plan: Plan, rngs: nnx.Rngs, *, forward: str = "factorized"
) -> nnx.Module:
  """A copy of `model` whose planned layers are factorized with random (He) factors: the
  "from scratch" baseline. Everything else is copied. `forward` as in `compress`."""
  _check_forward(forward)
  check_plan(plan, model)
  new = nnx.clone(model)
  layers = layer_paths(new)
  for p, lp in plan:
    set_path(new, p, _factorized(layers[p], lp, rngs=rngs, forward=forward))
  return new


def _check_forward(forward):
  if forward not in L.FORWARDS:
    raise ValueError(f"forward {forward!r}; allowed {L.FORWARDS}.")


def _factorized(m, lp: LayerPlan, **init) -> L.Factorized:
  """The factorized layer that replaces `m` under `lp`, with `m`'s strides, padding, bias
  flag and dtype; `init` is `params=, bias=` (from a decomposition) or `rngs=` (random),
  and `forward=`."""
  w = weight(m)
  rec = methods.get_method(lp.method)
  cls = rec.layer_class(conv=w.ndim == 4)
  common = dict(use_bias=getattr(m, "bias", None) is not None, param_dtype=w.dtype, **init)
  if w.ndim == 4:
    shape = (w.shape[2], w.shape[3], tuple(w.shape[:2]))
    return cls(*shape, *rec.hyper(lp), strides=m.strides, padding=m.padding, **common)
  return cls(w.shape[0], w.shape[1], *rec.hyper(lp), **common)
