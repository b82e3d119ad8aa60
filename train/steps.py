"""Train state, the jitted train/eval steps, the DeepTwist distortion and distillation losses.

The model is split once (`nnx.split`) into a static graph and two pytrees: `params`
(`nnx.Param`) and `rest` (BatchNorm statistics). Every step is a pure function of
`TrainState` and a batch, jitted once with the state donated; the teacher of a
distillation step is a separate, frozen argument (never differentiated, never saved).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import tnn
from train import data as data_lib
from train import sd_rule


class TrainState(NamedTuple):
  """Everything a run needs to continue: saved whole in every checkpoint."""

  step: jax.Array  # int32 scalar: optimizer steps taken (also the data position)
  params: Any  # nnx.State of nnx.Param
  rest: Any  # nnx.State of the rest (BatchNorm statistics)
  opt_state: Any
  key: jax.Array  # uint32 raw key data (typed keys do not serialise)
  refused: jax.Array  # int32: DeepTwist distortions refused for a non-finite value


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """Static settings of a train step (hashable: part of the jit cache key)."""

  num_classes: int
  mean: tuple
  std: tuple
  pad_to: int | None = None
  crop_pad: int = 0
  flip: bool = False
  label_smoothing: float = 0.0
  compute_dtype: str = "float32"
  # DeepTwist: distort every `sd` steps (after the update of steps sd, 2 sd, ...).
  sd: int = 0
  groups: tuple = ()  # ((LayerPlan, (path, ...)), ...)
  # Distillation: 'ce' (plain), 'kd' (logits; alpha, temperature), 'block' (Seq-KD block).
  loss: str = "ce"
  alpha: float = 0.9
  temperature: float = 4.0
  block: int = -1


def split_model(model: nnx.Module):
  return nnx.split(model, nnx.Param, ...)


def init_state(model: nnx.Module, tx: optax.GradientTransformation, seed: int):
  graphdef, params, rest = split_model(model)
  state = TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    rest=rest,
    opt_state=tx.init(params),
    key=jax.random.key_data(jax.random.key(seed)),
    refused=jnp.zeros((), jnp.int32),
  )
  return graphdef, state


def distortion_groups(model: nnx.Module, plan: tnn.Plan) -> tuple:
  """Paths grouped by (weight shape, layer plan): each group is one vmapped distortion."""
  layers = tnn.layer_paths(model)
  groups: dict = {}
  for p, lp in plan:
    groups.setdefault((tuple(layers[p].kernel.shape), lp), []).append(p)
  return tuple((lp, tuple(paths)) for (_, lp), paths in groups.items())


def distort_model(model: nnx.Module, groups: tuple) -> jax.Array:
  """Replaces each planned kernel of `model` (in place) by its low-rank reconstruction.

  A group whose distortion is not finite keeps its weights; returns how many groups were
  refused (int32)."""
  layers = tnn.layer_paths(model)
  refused = jnp.zeros((), jnp.int32)
  for lp, paths in groups:
    stack = jnp.stack([layers[p].kernel[...] for p in paths])
    new = jax.vmap(lambda w, lp=lp: tnn.distort(w, lp))(stack).astype(stack.dtype)
    ok = jnp.all(jnp.isfinite(new))
    refused = refused + jnp.where(ok, 0, 1).astype(jnp.int32)
    for i, p in enumerate(paths):
      layers[p].kernel[...] = jnp.where(ok, new[i], stack[i])
  return refused


def set_compute_dtype(model: nnx.Module, dtype) -> nnx.Module:
  """Mixed precision: every conv, dense, factorized and BatchNorm layer of `model` computes
  in `dtype` (its float32 params are cast at use; gradients reach them in float32);
  BatchNorm statistics are still computed and kept in float32. Returns `model`."""
  if jnp.dtype(dtype) == jnp.float32:
    return model
  for _, m in nnx.iter_modules(model):
    if isinstance(m, (nnx.Conv, nnx.Linear, nnx.BatchNorm, tnn.layers.Factorized)):
      m.dtype = jnp.dtype(dtype)
  return model


def _prepare(cfg: StepConfig, images, key, train: bool):
  x = data_lib.normalize(images, cfg.mean, cfg.std, cfg.pad_to)
  if train and (cfg.crop_pad or cfg.flip):
    x = data_lib.augment(key, x, crop_pad=cfg.crop_pad, flip=cfg.flip)
  return x.astype(cfg.compute_dtype)


def _cross_entropy(logits, labels, num_classes, smoothing):
  onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)  # float32 under x64 too
  if smoothing:
    onehot = optax.smooth_labels(onehot, smoothing)
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), onehot).mean()


def _masked(tree, mask):
  return jax.tree.map(lambda a, m: a * m, tree, mask)


def _loss(graphdef, cfg: StepConfig, params, rest, x, labels, teacher_out):
  """(loss, (logits or None, new BatchNorm statistics)) of one train-mode forward pass."""
  model = set_compute_dtype(nnx.merge(graphdef, params, rest, copy=True), cfg.compute_dtype)
  model.train()
  if cfg.loss == "block":
    feats_in, target = teacher_out
    y = model.blocks[cfg.block](feats_in)
    loss = jnp.mean(jnp.square(y.astype(jnp.float32) - target.astype(jnp.float32)))
    logits = None
  else:
    logits = model(x)
    loss = _cross_entropy(logits, labels, cfg.num_classes, cfg.label_smoothing)
    if cfg.loss == "kd":
      t = cfg.temperature
      soft = jax.nn.softmax(teacher_out.astype(jnp.float32) / t)
      kd = optax.softmax_cross_entropy(logits.astype(jnp.float32) / t, soft).mean() * t * t
      loss = cfg.alpha * kd + (1 - cfg.alpha) * loss
  _, _, new_rest = split_model(model)
  return loss, (logits, new_rest)


def make_train_step(graphdef, tx, cfg: StepConfig, mask=None) -> Callable:
  """`train_step(state, batch, teacher=None) -> (state, metrics)`, jitted, state donated.

  `batch = (images uint8 (N, H, W, C), labels int32 (N,))`. `teacher = (graphdef, params,
  rest)` for the distillation losses. `mask` (a params-shaped tree of 0/1) freezes the
  params it zeroes (Seq-KD trains one block at a time).
  """

  def loss_fn(params, rest, x, labels, teacher_out):
    return _loss(graphdef, cfg, params, rest, x, labels, teacher_out)

  def train_step(state: TrainState, batch, teacher=None):
    images, labels = batch
    key, k_aug = jax.random.split(jax.random.wrap_key_data(state.key))
    x = _prepare(cfg, images, k_aug, train=True)
    teacher_out = None
    if teacher is not None:
      t_model = set_compute_dtype(nnx.merge(*teacher, copy=True), cfg.compute_dtype)
      t_model.eval()
      if cfg.loss == "block":
        feats = t_model.features(x)
        teacher_out = (feats[cfg.block], feats[cfg.block + 1])
      else:
        teacher_out = t_model(x)
      teacher_out = jax.lax.stop_gradient(teacher_out)
    (loss, (logits, new_rest)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params, state.rest, x, labels, teacher_out
    )
    if mask is not None:
      grads = _masked(grads, mask)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    if mask is not None:
      updates = _masked(updates, mask)
    params = optax.apply_updates(state.params, updates)
    step = state.step + 1
    refused = state.refused
    if cfg.sd:

      def distort(params):
        model = nnx.merge(graphdef, params, new_rest, copy=True)
        n = distort_model(model, cfg.groups)
        return split_model(model)[1], n

      params, n = jax.lax.cond(
        step % cfg.sd == 0, distort, lambda p: (p, jnp.zeros((), jnp.int32)), params
      )
      refused = refused + n
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
    if logits is not None:
      metrics["accuracy"] = jnp.mean(jnp.argmax(logits, -1) == labels)
    state = TrainState(step, params, new_rest, opt_state, jax.random.key_data(key), refused)
    return state, metrics

  return jax.jit(train_step, donate_argnums=0)


def make_eval_step(graphdef, cfg: StepConfig) -> Callable:
  """`eval_step(params, rest, images, labels) -> number correct` (eval-mode BatchNorm)."""

  def eval_step(params, rest, images, labels):
    model = set_compute_dtype(nnx.merge(graphdef, params, rest, copy=True), cfg.compute_dtype)
    model.eval()
    logits = model(_prepare(cfg, images, None, train=False))
    return jnp.sum(jnp.argmax(logits, -1) == labels)

  return jax.jit(eval_step)


def make_recalibrate_step(graphdef, cfg: StepConfig) -> Callable:
  """`step(params, rest, images) -> rest` holding this batch's BatchNorm statistics alone."""

  def step(params, rest, images):
    model = nnx.merge(graphdef, params, rest, copy=True)
    for _, m in nnx.iter_modules(model):
      if isinstance(m, nnx.BatchNorm):
        m.momentum = 0.0  # running stats := batch stats
    model.train()
    model(_prepare(cfg, images, None, train=False))
    return split_model(model)[2]

  return jax.jit(step)


def sd_estimate(model: nnx.Module, cfg: StepConfig, batches, *, lr, momentum, recover):
  """DeepTwist SD at `model`'s weights for the distortion of `cfg.groups` (`train.sd_rule`).

  `batches`: (images uint8, labels) pairs; the loss is `cfg`'s train loss, un-augmented.
  """
  graphdef, params, rest = split_model(model)

  def loss_fn(p, batch):
    images, labels = batch
    x = _prepare(cfg, images, None, train=False)
    return _loss(graphdef, cfg, p, rest, x, labels, None)[0]

  @jax.jit
  def distort(p):
    m = nnx.merge(graphdef, p, rest, copy=True)
    distort_model(m, cfg.groups)
    return split_model(m)[1]

  return sd_rule.estimate_sd(
    loss_fn, params, batches, distort, lr=lr, momentum=momentum, recover=recover
  )


def block_mask(params, block: int):
  """1 for the params of `blocks.<block>`, 0 elsewhere."""
  flat = nnx.to_flat_state(params)
  leaves = []
  for path, v in flat:
    on = len(path) > 1 and path[0] == "blocks" and path[1] == block
    leaves.append((path, v.replace(jnp.full(v.shape, 1.0 if on else 0.0, v.dtype))))
  return nnx.from_flat_state(leaves)
