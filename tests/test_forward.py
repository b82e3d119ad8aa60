"""`tnn.choose_forward` / `tnn.set_forward`: each factorized layer's path chosen by
measurement; the chosen model is the same function as the all-factorized one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import tnn
from tnn.counts import _input_shapes

SHAPE = (2, 16, 16, 1)


def _model(forward="factorized"):
  dense = tnn.models.cnn(10, rngs=nnx.Rngs(0), in_channels=1, widths=(8, 16, 16))
  plan = tnn.make_plan(dense, "tr", ratio=0.3)
  return tnn.factorize_random(dense, plan, nnx.Rngs(1), forward=forward)


def _factorized_paths(model):
  return [p for p, m in tnn.layer_paths(model).items() if isinstance(m, tnn.layers.Factorized)]


def _weight_shapes(model):
  layers = tnn.layer_paths(model)
  return {p: layers[p].weight_shape for p in _factorized_paths(model)}


def _out_and_grads(model, x):
  graph, state = nnx.split(model)

  def loss(state, x):
    m = nnx.merge(graph, state)
    m.eval()
    y = m(x)
    return jnp.sum(y * jnp.arange(y.size, dtype=y.dtype).reshape(y.shape) / y.size), y

  (_, y), (gs, gx) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(state, x)
  return y, gx, gs


def test_layer_mode_picks_the_faster_path_per_group():
  model = _model()
  shapes = _weight_shapes(model)
  calls = []

  def measure(layer, in_shape, forward):
    calls.append((layer.weight_shape, tuple(in_shape), forward))
    # the rebuilt weight 2x faster on 16-channel inputs, 1.02x (inside the margin) on 8
    fast = layer.weight_shape[2] == 16
    return 1.0 if forward == "factorized" else (0.5 if fast else 0.98)

  choice, times = tnn.choose_forward(model, SHAPE, measure=measure, margin=0.05)
  assert set(choice) == set(shapes)
  for p, ws in shapes.items():
    assert choice[p] == ("reconstructed" if ws[2] == 16 else "factorized"), p
    assert times[p]["factorized"] == 1.0
  # alike layers (same weight shape and input shape) are measured once, both paths
  groups = {(c[0], c[1]) for c in calls}
  assert len(calls) == 2 * len(groups) < 2 * len(shapes)
  # nothing was changed on the model
  assert all(tnn.layer_paths(model)[p].forward == "factorized" for p in shapes)
  choice0, _ = tnn.choose_forward(model, SHAPE, measure=measure, margin=0.6)
  assert set(choice0.values()) == {"factorized"}  # 2x is inside a 60% margin


def test_step_mode_is_greedy_over_groups_and_restores_the_model():
  model = _model()
  paths = _factorized_paths(model)
  # a fake step: each layer costs 1 factorized; rebuilt, 0.4 with 16 input channels and
  # 1.5 otherwise, so the best choice switches exactly the 16-channel groups
  seen = []

  def step_time(m):
    fw = {p: tnn.layer_paths(m)[p].forward for p in paths}
    seen.append(fw)
    return sum(
      1.0 if f == "factorized" else (0.4 if tnn.layer_paths(m)[p].weight_shape[2] == 16 else 1.5)
      for p, f in fw.items()
    )

  choice, times = tnn.choose_forward(model, SHAPE, step_time=step_time)
  for p in paths:
    want = "reconstructed" if tnn.layer_paths(model)[p].weight_shape[2] == 16 else "factorized"
    assert choice[p] == want, p
    assert times[p]["switched"] != times[p]["before"]
  assert set(seen[0].values()) == {"factorized"}  # the baseline first
  inputs = _input_shapes(model, SHAPE)
  layers = tnn.layer_paths(model)
  n_groups = len({(layers[p].weight_shape, layers[p].strides, inputs[p]) for p in paths})
  assert len(seen) == 1 + n_groups
  assert all(tnn.layer_paths(model)[p].forward == "factorized" for p in paths)


def test_the_chosen_model_is_the_same_function():
  # float32 (the model's params): the two paths differ by float32 rounding, a wrong path
  # by O(1); the layer tests check each path in float64
  x = jax.random.normal(jax.random.key(0), SHAPE, jnp.float32)
  ref = _model()
  mixed = _model()
  paths = _factorized_paths(mixed)
  choice = {p: ("reconstructed" if i % 2 else "factorized") for i, p in enumerate(paths)}
  assert tnn.set_forward(mixed, choice) is mixed
  assert [tnn.layer_paths(mixed)[p].forward for p in paths] == [choice[p] for p in paths]
  y1, gx1, gs1 = _out_and_grads(ref, x)
  y2, gx2, gs2 = _out_and_grads(mixed, x)

  def close(a, b):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4 * float(jnp.max(jnp.abs(b))))

  close(y2, y1)
  close(gx2, gx1)
  for a, b in zip(jax.tree.leaves(gs2), jax.tree.leaves(gs1), strict=True):
    close(a, b)
  tnn.set_forward(mixed, "reconstructed")
  assert {tnn.layer_paths(mixed)[p].forward for p in paths} == {"reconstructed"}


def test_measured_choice_covers_every_factorized_layer():
  model = _model()
  choice, times = tnn.choose_forward(model, SHAPE, reps=1, dtype=jnp.float32)
  assert set(choice) == set(_factorized_paths(model))
  for p, fw in choice.items():
    t = times[p]
    assert min(t.values()) > 0
    assert fw == ("reconstructed" if t["reconstructed"] < 0.95 * t["factorized"] else "factorized")


def test_bad_arguments_name_themselves():
  model = _model()
  p0 = _factorized_paths(model)[0]
  with pytest.raises(ValueError, match="not a factorized layer"):
    tnn.set_forward(model, {p0: "reconstructed", "head.nope": "factorized"})
  assert tnn.layer_paths(model)[p0].forward == "factorized"  # nothing changed
  with pytest.raises(ValueError, match="forward 'fast'"):
    tnn.set_forward(model, {p0: "fast"})
  with pytest.raises(ValueError, match="margin must be in"):
    tnn.choose_forward(model, SHAPE, margin=1.0)
  with pytest.raises(ValueError, match="reps must be a positive int"):
    tnn.choose_forward(model, SHAPE, reps=0)
