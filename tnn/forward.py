"""Each factorized layer's forward path, chosen by measurement on the current backend.

A factorized layer computes one function two ways (`tnn.layers.Factorized.forward`): its
method's pipeline (`"factorized"`, the cost `macs` counts) or one conv/matmul through
the weight rebuilt from its factors (`"reconstructed"`). Values and gradients agree to
rounding; which is faster depends on the backend and the shapes, not on the multiply-add
count. On XLA's CPU backend a pipeline of tiny-channel convs loses to the dense conv it
replaces (a TR layer at 25% of a 16-channel 3x3 conv has rings of rank 3: its `(d x 1)`
convs have 3 channels) while the same kind wins on a 64-channel layer.

`choose_forward(model, input_shape, step_time=...)` tries, for each group of alike
factorized layers (kind, hyper-parameters, weight shape, strides, padding and input
shape), the rebuilt weight in the caller's whole step and keeps it where the step got
faster by more than `margin`; without `step_time` it times each group's layer alone
(forward and backward). It returns `{path: forward}` and the times; `set_forward(model,
choice)` applies it. This is an explicit, measured choice, like cuDNN's algorithm search:
the choice is returned to be recorded, and nothing changes unless it is applied.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from tnn import layers as L
from tnn.counts import _input_shapes
from tnn.plan import layer_paths

__all__ = ["choose_forward", "set_forward"]


def _key(m: L.Factorized, in_shape) -> tuple:
  return (
    type(m).__name__,
    m.kind.name,
    repr(m.hyper),
    m.weight_shape,
    m.strides,
    repr(m.padding),
    m.bias is not None,
    repr(m.dtype),
    tuple(in_shape),
  )


def time_layer(layer: L.Factorized, in_shape, forward: str, *, reps: int, dtype) -> float:
  """Median seconds of one jitted forward + backward of `layer` through `forward`, for an
  input of `in_shape` (compile and one warm-up call excluded)."""
  m = nnx.clone(layer)
  m.forward = forward
  graph, params = nnx.split(m)
  x = jax.random.normal(jax.random.PRNGKey(0), tuple(in_shape), dtype)
  out = jax.eval_shape(lambda p, x: nnx.merge(graph, p)(x), params, x)
  ct = jax.random.normal(jax.random.PRNGKey(1), out.shape, out.dtype)

  @jax.jit
  def grads(p, x):
    return jax.grad(lambda p, x: jnp.sum(nnx.merge(graph, p)(x) * ct), argnums=(0, 1))(p, x)

  jax.block_until_ready(grads(params, x))
  jax.block_until_ready(grads(params, x))
  ts = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(grads(params, x))
    ts.append(time.perf_counter() - t0)
  return statistics.median(ts)


def choose_forward(
  model: nnx.Module,
  input_shape: Sequence[int],
  *,
  step_time: Callable[[nnx.Module], float] | None = None,
  reps: int = 7,
  margin: float = 0.05,
  dtype=jnp.float32,
  measure: Callable[..., float] | None = None,
) -> tuple[dict, dict]:
  """`{path: "factorized" | "reconstructed"}` for every factorized layer of `model`, each
  the faster of its two paths at `input_shape` (NHWC, batch included) on the default
  backend. Layers alike (same kind, hyper-parameters, weight shape, strides, padding and
  input shape) form one group and take one path. A path replaces the pipeline only when
  it is faster by more than `margin` (in [0, 1)).

  Two ways to measure:

  - `step_time` (a callable: seconds of the caller's whole step, e.g. a training step,
    for a model): the groups are tried in turn, each switched to the rebuilt weight on
    top of the choices kept so far, and kept where the step got faster. This counts
    what a layer costs inside the step (XLA fuses the BatchNorm and ReLU around a conv
    into it, which a layer timed alone does not show); it compiles the step
    `1 + groups` times. The model's paths are left as they were.
  - otherwise each group's layer alone, forward and backward (`time_layer`, `reps`
    timed calls; `measure(layer, in_shape, forward)` replaces it).

  Returns `(choice, seconds)`: `{path: forward}` and the measured seconds, per path
  `{"factorized": s, "reconstructed": s}` (layer mode) or, per group tried, the step's
  `{"before": s, "switched": s}` (step mode).
  """
  if not isinstance(reps, int) or reps < 1:
    raise ValueError(f"reps must be a positive int, got {reps!r}; allowed range [1, ...].")
  if not 0 <= margin < 1:
    raise ValueError(f"margin must be in [0, 1), got {margin!r}.")
  shapes = _input_shapes(model, input_shape)
  layers = layer_paths(model)
  groups: dict = {}
  for path, m in layers.items():
    if isinstance(m, L.Factorized):
      groups.setdefault(_key(m, shapes[path]), []).append(path)
  if step_time is not None:
    return _by_step(model, layers, groups, step_time, margin)
  if measure is None:

    def measure(layer, in_shape, forward):
      return time_layer(layer, in_shape, forward, reps=reps, dtype=dtype)

  choice, times = {}, {}
  for paths in groups.values():
    t = {fw: measure(layers[paths[0]], shapes[paths[0]], fw) for fw in L.FORWARDS}
    best = "reconstructed" if t["reconstructed"] < (1 - margin) * t["factorized"] else "factorized"
    for p in paths:
      choice[p], times[p] = best, dict(t)
  return choice, times


def _by_step(model, layers: dict, groups: dict, step_time, margin: float) -> tuple[dict, dict]:
  before = {p: layers[p].forward for paths in groups.values() for p in paths}
  choice = {p: "factorized" for p in before}
  times = {}
  try:
    set_forward(model, choice)
    best = step_time(model)
    for paths in groups.values():
      trial = dict(choice, **{p: "reconstructed" for p in paths})
      set_forward(model, trial)
      t = step_time(model)
      for p in paths:
        times[p] = {"before": best, "switched": t}
      if t < (1 - margin) * best:
        choice, best = trial, t
  finally:
    set_forward(model, before)
  return choice, times


def set_forward(model: nnx.Module, forward: str | Mapping[str, str]) -> nnx.Module:
  """Sets the `forward` of `model`'s factorized layers in place: every one to `forward`
  (a string), or each path of a mapping `{path: forward}` (a `choose_forward` result) to
  its value. Returns `model`. A path that is not a factorized layer of `model`, or a value
  outside `tnn.layers.FORWARDS`, raises `ValueError` before anything is changed."""
  layers = {p: m for p, m in layer_paths(model).items() if isinstance(m, L.Factorized)}
  todo = {p: forward for p in layers} if isinstance(forward, str) else dict(forward)
  for p, fw in todo.items():
    if p not in layers:
      raise ValueError(f"set_forward: {p!r} is not a factorized layer of the model.")
    if fw not in L.FORWARDS:
      raise ValueError(f"set_forward: forward {fw!r} for {p!r}; allowed {L.FORWARDS}.")
  for p, fw in todo.items():
    layers[p].forward = fw
  return model
