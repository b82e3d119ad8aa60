"""Parameters and MACs of a model, dense and factorized layers alike (`report`)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from tnn import layers as L
from tnn import ops
from tnn.plan import layer_paths, path_str, set_path, weight_shape

__all__ = ["report"]


class _Probe(nnx.Module):
  """Stands in for one layer during `_input_shapes`' abstract forward pass: records the
  shape of its input, then calls the layer."""

  def __init__(self, layer, path: str, record):
    self.layer, self.path, self.record = layer, path, record

  def __call__(self, x, *args, **kwargs):
    self.record(self.path, tuple(x.shape))
    return self.layer(x, *args, **kwargs)


def _input_shapes(model: nnx.Module, input_shape) -> dict:
  """`{path: input shape}` of every conv/dense layer, from one abstract forward pass of a
  copy of the model in which each such layer is wrapped in a `_Probe` (the model and the
  layer classes are left as they are)."""
  classes = (nnx.Conv, nnx.Linear, L.Factorized)
  graph, state = nnx.split(model)
  shapes: dict = {}

  def run(state, x):
    m = nnx.merge(graph, state)
    m.eval()
    for path, mod in list(nnx.iter_modules(m)):
      if path and isinstance(mod, classes):
        set_path(m, path_str(path), _Probe(mod, path_str(path), shapes.__setitem__))
    m(x)
    return 0

  jax.eval_shape(run, state, jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32))
  return shapes


def _dense_macs(m, in_shape, w_shape) -> int:
  if len(w_shape) == 4:
    strides = m.strides if isinstance(m, L.Factorized) else _nnx_strides(m)
    padding = m.padding
    if isinstance(padding, int):
      padding = ((padding, padding), (padding, padding))
    return ops.conv_macs(in_shape, w_shape, strides=strides, padding=padding)
  return math.prod(in_shape[:-1]) * w_shape[0] * w_shape[1]


def _nnx_strides(m) -> tuple:
  s = m.strides
  return (s, s) if isinstance(s, int) else tuple(s)


def report(model: nnx.Module, input_shape: Sequence[int]) -> dict:
  """Parameters and MACs of `model` at `input_shape` (NHWC, batch included).

  Returns:
    `{"params", "macs", "dense_params", "dense_macs", "params_ratio", "macs_ratio",
    "layers": [{"path", "type", "params", "macs", "dense_params", "dense_macs"}]}`.
    `params` counts every `nnx.Param` (BatchNorm scale/bias included); `macs` the conv and
    dense layers' multiply-adds (factorized ones through their pipelines); the `dense_*`
    figures are the same model with every factorized layer replaced by its dense weight.
  """
  shapes = _input_shapes(model, input_shape)
  rows = []
  for p, m in layer_paths(model).items():
    w_shape = weight_shape(m)
    has_bias = getattr(m, "bias", None) is not None
    dense_params = math.prod(w_shape) + (w_shape[-1] if has_bias else 0)
    dense_macs = _dense_macs(m, shapes[p], w_shape) if p in shapes else 0
    if isinstance(m, L.Factorized):
      params, macs = m.num_params(), (m.macs(shapes[p]) if p in shapes else 0)
    else:
      params, macs = dense_params, dense_macs
    rows.append(
      dict(
        path=p,
        type=type(m).__name__,
        params=params,
        macs=macs,
        dense_params=dense_params,
        dense_macs=dense_macs,
      )
    )
  total = sum(math.prod(v.shape) for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
  layer_params = sum(r["params"] for r in rows)
  dense_total = total - layer_params + sum(r["dense_params"] for r in rows)
  macs = sum(r["macs"] for r in rows)
  dense_macs = sum(r["dense_macs"] for r in rows)
  return dict(
    params=int(total),
    macs=int(macs),
    dense_params=int(dense_total),
    dense_macs=int(dense_macs),
    params_ratio=total / dense_total,
    macs_ratio=macs / dense_macs if dense_macs else 1.0,
    layers=rows,
  )
