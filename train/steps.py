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
  # Who runs the convolutions where the step is lowered for the CPU (`tnn.ops.CONV_BACKENDS`);
  # "onednn" also runs BatchNorm's reductions as tensorial's CPU kernels (`tnn.norm`).
  cpu_conv: str = "xla"
  # DeepTwist: distort every `sd` steps (after the update of steps sd, 2 sd, ...:
  # `is_distortion`).
  sd: int = 0
  groups: tuple = ()  # ((LayerPlan, (path, ...)), ...)


def is_distortion(step, sd: int):
  """Whether DeepTwist distorts after the update of (1-based) `step`: every `sd` steps."""
  return step % sd == 0


def deeptwist_steps(steps: int, sd: int) -> int:
  """A DeepTwist run's length: `steps` rounded up to a multiple of `sd`, so that its last
  step is a distortion (the net it ends with is exactly low-rank)."""
  return -(-steps // sd) * sd


def distortion_steps(steps: int, sd: int) -> range:
  """The (1-based) steps of a `steps`-step DeepTwist run after which it distorts."""
  return range(sd, steps + 1, sd)


# --- losses: what a train step minimises ----------------------------------------------
# A loss is a hashable callable `loss(model, x, labels, target, cfg) -> (value, logits or
# None)` with `teacher_target(teacher_model, x)` (what it needs from the frozen teacher;
# `needs_teacher` False: nothing), `block` (the one block it trains, or None) and
# `fingerprint()` (its settings, for the phase's fingerprint).


@dataclasses.dataclass(frozen=True)
class CrossEntropy:
  """Cross-entropy on the labels (with `cfg.label_smoothing`)."""

  needs_teacher = False
  block = None

  def teacher_target(self, teacher, x):
    return None

  def __call__(self, model, x, labels, target, cfg):
    logits = model(x)
    return _cross_entropy(logits, labels, cfg.num_classes, cfg.label_smoothing), logits

  def fingerprint(self) -> dict:
    return dict(loss="ce", alpha=0.9, temperature=4.0, block=-1)


@dataclasses.dataclass(frozen=True)
class Distillation:
  """Hinton et al.'s distillation on logits: `alpha * T^2 * CE(softmax(s/T), softmax(t/T))
  + (1 - alpha) * CE(labels)`. The defaults are TNN's (the configs' `alpha`, `temperature`
  fall back to them)."""

  alpha: float = 0.9
  temperature: float = 4.0
  needs_teacher = True
  block = None

  def teacher_target(self, teacher, x):
    return teacher(x)

  def __call__(self, model, x, labels, target, cfg):
    logits = model(x)
    ce = _cross_entropy(logits, labels, cfg.num_classes, cfg.label_smoothing)
    t = self.temperature
    soft = jax.nn.softmax(target.astype(jnp.float32) / t)
    kd = optax.softmax_cross_entropy(logits.astype(jnp.float32) / t, soft).mean() * t * t
    return self.alpha * kd + (1 - self.alpha) * ce, logits

  def fingerprint(self) -> dict:
    return dict(loss="kd", alpha=self.alpha, temperature=self.temperature, block=-1)


@dataclasses.dataclass(frozen=True)
class BlockMSE:
  """Seq-KD (TNN): the student's block `block`, fed the teacher's input to that block,
  matches the teacher's output of it (MSE); only that block trains (`block`: the train
  step masks every other parameter)."""

  block: int
  needs_teacher = True

  def teacher_target(self, teacher, x):
    feats = teacher.features(x)
    return feats[self.block], feats[self.block + 1]

  def __call__(self, model, x, labels, target, cfg):
    feats_in, want = target
    y = model.blocks[self.block](feats_in)
    return jnp.mean(jnp.square(y.astype(jnp.float32) - want.astype(jnp.float32))), None

  def fingerprint(self) -> dict:
    return dict(loss="block", alpha=0.9, temperature=4.0, block=self.block)


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


def _loss(graphdef, cfg: StepConfig, loss, params, rest, x, labels, target):
  """(loss, (logits or None, new BatchNorm statistics)) of one train-mode forward pass."""
  model = set_compute_dtype(nnx.merge(graphdef, params, rest, copy=True), cfg.compute_dtype)
  model.train()
  with tnn.ops.conv_backend(cfg.cpu_conv):
    value, logits = loss(model, x, labels, target, cfg)
  _, _, new_rest = split_model(model)
  return value, (logits, new_rest)


def make_train_step(graphdef, tx, cfg: StepConfig, mask=None, *, loss=None) -> Callable:
  """`train_step(state, batch, teacher=None) -> (state, metrics)`, jitted, state donated.

  `batch = (images uint8 (N, H, W, C), labels int32 (N,))`. `loss`: `CrossEntropy` (default),
  `Distillation` or `BlockMSE` (or any callable of that form); `teacher = (graphdef,
  params, rest)` for the losses that need one. `mask` (a params-shaped tree of 0/1) freezes
  the params it zeroes (`block_mask(params, loss.block)` for `BlockMSE`).
  """

  loss = loss or CrossEntropy()

  def loss_fn(params, rest, x, labels, target):
    return _loss(graphdef, cfg, loss, params, rest, x, labels, target)

  def train_step(state: TrainState, batch, teacher=None):
    images, labels = batch
    key, k_aug = jax.random.split(jax.random.wrap_key_data(state.key))
    x = _prepare(cfg, images, k_aug, train=True)
    target = None
    if teacher is not None:
      t_model = set_compute_dtype(nnx.merge(*teacher, copy=True), cfg.compute_dtype)
      t_model.eval()
      with tnn.ops.conv_backend(cfg.cpu_conv):
        target = jax.lax.stop_gradient(loss.teacher_target(t_model, x))
    (value, (logits, new_rest)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params, state.rest, x, labels, target
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
        is_distortion(step, cfg.sd), distort, lambda p: (p, jnp.zeros((), jnp.int32)), params
      )
      refused = refused + n
    metrics = {"loss": value, "grad_norm": optax.tree.norm(grads)}
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
    with tnn.ops.conv_backend(cfg.cpu_conv):
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
    with tnn.ops.conv_backend(cfg.cpu_conv):
      model(_prepare(cfg, images, None, train=False))
    return split_model(model)[2]

  return jax.jit(step)


def sd_estimate(model: nnx.Module, cfg: StepConfig, batches, *, lr, momentum, recover):
  """DeepTwist SD at `model`'s weights for the distortion of `cfg.groups` (`train.sd_rule`).

  `batches`: (images uint8, labels) pairs; the loss is the cross-entropy, un-augmented.
  """
  graphdef, params, rest = split_model(model)

  def loss_fn(p, batch):
    images, labels = batch
    x = _prepare(cfg, images, None, train=False)
    return _loss(graphdef, cfg, CrossEntropy(), p, rest, x, labels, None)[0]

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
