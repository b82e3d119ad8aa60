"""train.sd_rule: the DeepTwist SD from a local quadratic model, checked on exact quadratics."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train import sd_rule


def _quadratic(hdiag, w_star):
  def loss(w, batch):
    del batch
    return 0.5 * jnp.sum(hdiag * jnp.square(w["w"] - w_star))

  return loss


def _project(w, k):
  """A 'distortion': zero all but the first k coordinates."""
  return {"w": w["w"].at[k:].set(0.0)}


def test_curvature_is_exact_on_a_quadratic():
  rng = np.random.default_rng(0)
  hdiag = jnp.asarray(rng.uniform(0.5, 3.0, 8))
  w_star = jnp.asarray(rng.normal(size=8))
  w = {"w": w_star + 0.1 * jnp.asarray(rng.normal(size=8))}  # not at the minimum: g != 0
  est = sd_rule.estimate_sd(
    _quadratic(hdiag, w_star), w, [None, None], lambda p: _project(p, 3), lr=0.05
  )
  d = np.asarray(_project(w, 3)["w"] - w["w"])
  want = float(d @ (np.asarray(hdiag) * d) / (d @ d))  # Rayleigh quotient along delta
  assert est.curvature == pytest.approx(want, rel=1e-10)
  assert est.delta_norm == pytest.approx(np.linalg.norm(d), rel=1e-12)


@pytest.mark.parametrize("lr,h,recover", [(0.01, 2.0, 0.1), (0.1, 1.5, 0.01), (0.3, 0.2, 0.5)])
def test_sd_is_the_first_step_count_that_recovers(lr, h, recover):
  """Gradient descent on the model itself: SD steps recover all but `recover` of the excess
  loss of the distortion, SD - 1 steps do not."""
  w_star = jnp.zeros(4)
  loss = _quadratic(jnp.full(4, h), w_star)
  w = {"w": w_star}
  est = sd_rule.estimate_sd(loss, w, [None], lambda p: {"w": p["w"] + 1.0}, lr=lr, recover=recover)
  assert est.curvature == pytest.approx(h, rel=1e-10)

  def excess_after(k):
    x = {"w": w_star + 1.0}
    for _ in range(k):
      x = jax.tree.map(lambda a, g: a - lr * g, x, jax.grad(loss)(x, None))
    return float(loss(x, None))

  e0 = excess_after(0)
  assert excess_after(est.sd) <= recover * e0 * (1 + 1e-9)
  assert excess_after(est.sd - 1) > recover * e0


def test_momentum_uses_the_effective_learning_rate():
  sd0, c0 = sd_rule.sd_from_curvature(1.0, 0.01, 0.0, 0.1)
  sd9, c9 = sd_rule.sd_from_curvature(1.0, 0.01, 0.9, 0.1)
  assert c9 == pytest.approx(1 - 0.1) and c0 == pytest.approx(1 - 0.01)
  assert sd9 == math.ceil(math.log(0.1) / (2 * math.log(0.9)))
  assert sd9 < sd0


def test_one_step_when_the_model_recovers_at_once():
  assert sd_rule.sd_from_curvature(100.0, 0.1, 0.0, 0.1) == (1, 0.0)


@pytest.mark.parametrize(
  "args,match",
  [
    ((-1.0, 0.1, 0.0, 0.1), "not convex along the distortion"),
    ((0.0, 0.1, 0.0, 0.1), "not convex along the distortion"),
    ((1.0, 0.1, 0.0, 1.0), "recover must be in"),
    ((1.0, 0.0, 0.0, 0.1), "lr must be > 0"),
    ((1.0, 0.1, 1.0, 0.1), "momentum must be in"),
  ],
)
def test_bad_inputs(args, match):
  with pytest.raises(ValueError, match=match):
    sd_rule.sd_from_curvature(*args)


def test_a_distortion_that_changes_nothing_is_an_error():
  loss = _quadratic(jnp.ones(3), jnp.zeros(3))
  with pytest.raises(ValueError, match=r"\|delta\| = 0"):
    sd_rule.estimate_sd(loss, {"w": jnp.ones(3)}, [None], lambda p: p, lr=0.1)
