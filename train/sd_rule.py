"""The DeepTwist distortion step `SD` from a local quadratic model of the loss.

DeepTwist (Lee et al., "Learning Low-Rank Approximation for CNNs", 2019, section 2.1)
reasons about `SD` with a quadratic model of the loss near the current weights `w`: a
distortion moves `w` by `delta = distort(w) - w`; plain training then pulls the weights
back along `delta` at a rate set by the learning rate and the curvature. If `SD` is too
short, training cannot recover from one distortion before the next; too long, and the
weights return to the dense minimum and the distortion is undone.

Our reading of that rule, made concrete (the paper gives the model, not a formula):

1. Fit the quadratic along `delta` through the loss and its slope at `w` and the loss at
   the distorted point: `h = 2 (L(w + delta) - L(w) - g . delta) / |delta|^2`, averaged
   over a few batches (train-mode BatchNorm, as SGD sees the loss).
2. Under SGD with learning rate `lr` and heavy-ball momentum `mu` the deviation along
   `delta` contracts by `c = 1 - lr h / (1 - mu)` per step (the slow root of the
   heavy-ball recurrence, exact for `mu = 0`), so the excess loss the distortion caused
   decays by `c^2` per step.
3. `SD` is the number of steps after which the model has recovered all but a fraction
   `recover` of that excess: `SD = ceil(log(recover) / (2 log c))`, at least 1; `SD = 1`
   when `lr h / (1 - mu) >= 1` (the model recovers in one step).

A non-positive `h` (the loss is not convex along the distortion) gives no SD: that is a
`ValueError` asking for an explicit `sd`, not a silent default.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax


class SDEstimate(NamedTuple):
  sd: int
  curvature: float  # h, averaged over the batches
  delta_norm: float  # |delta|
  loss: float  # L(w), averaged
  loss_distorted: float  # L(w + delta), averaged
  contraction: float  # c


def curvature_along(
  loss_fn: Callable, params, delta, batch
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(h, L(w), L(w + delta)) of the quadratic through L(w), grad L(w) . delta, L(w + delta)."""
  loss, grad = jax.value_and_grad(loss_fn)(params, batch)
  loss_d = loss_fn(jax.tree.map(jnp.add, params, delta), batch)
  dd = optax.tree.vdot(delta, delta)
  h = 2 * (loss_d - loss - optax.tree.vdot(grad, delta)) / dd
  return h, loss, loss_d


def sd_from_curvature(h: float, lr: float, momentum: float, recover: float) -> tuple[int, float]:
  """(SD, contraction) of step 2-3 above."""
  if not 0 < recover < 1:
    raise ValueError(f"recover must be in (0, 1), got {recover}.")
  if not lr > 0:
    raise ValueError(f"lr must be > 0, got {lr}.")
  if not 0 <= momentum < 1:
    raise ValueError(f"momentum must be in [0, 1), got {momentum}.")
  if not h > 0:
    raise ValueError(
      f"the loss is not convex along the distortion (curvature {h:.3g} <= 0): the quadratic "
      "model gives no SD; set config.deeptwist.sd explicitly."
    )
  rate = lr * h / (1 - momentum)
  if rate >= 1:
    return 1, 0.0
  c = 1 - rate
  return max(1, math.ceil(math.log(recover) / (2 * math.log(c)))), c


def estimate_sd(
  loss_fn: Callable,
  params,
  batches: Iterable,
  distort: Callable,
  *,
  lr: float,
  momentum: float = 0.0,
  recover: float = 0.1,
) -> SDEstimate:
  """Estimates SD at `params` for the distortion `distort(params) -> params`.

  `loss_fn(params, batch)`: the scalar training loss; the curvature is averaged over
  `batches`. `distort` runs once, on the host's call (it may be jitted).
  """
  delta = jax.tree.map(jnp.subtract, distort(params), params)
  dn = float(jnp.sqrt(optax.tree.vdot(delta, delta)))
  if not dn > 0:
    raise ValueError("the distortion does not change the weights (|delta| = 0): no SD to estimate.")
  hs, ls, lds = [], [], []
  step = jax.jit(curvature_along, static_argnums=0)
  for batch in batches:
    h, loss, loss_d = step(loss_fn, params, delta, batch)
    hs.append(float(h))
    ls.append(float(loss))
    lds.append(float(loss_d))
  if not hs:
    raise ValueError("batches is empty: at least one batch is needed.")
  h = sum(hs) / len(hs)
  sd, c = sd_from_curvature(h, lr, momentum, recover)
  return SDEstimate(sd, h, dn, sum(ls) / len(ls), sum(lds) / len(lds), c)
