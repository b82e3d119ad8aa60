"""One training phase (dense, deeptwist, finetune, seqkd, e2ekd, scratch) with checkpoints.

`run_phase` owns the loop: restore the newest good checkpoint of its folder if there is
one (else start from the state it is given), take jitted steps, log JSON lines,
checkpoint every `checkpoint_every` steps and at the end (`train.checkpoint`: named,
checksummed arrays, written atomically, last N kept). A run killed at any moment and
started again resumes from its last checkpoint, and, because the batch order and the
augmentation keys are functions of the step and the saved key, ends with the same
parameters as an uninterrupted run.

Every checkpoint records the phase's fingerprint: everything that shapes its state or its
result (model, plan, optimizer and schedule, steps, batch size, seed, the step's
settings, and the fingerprint of the phase it started from). A checkpoint whose
fingerprint differs from the one the phase would have now is refused before any step
(`ConfigMismatch`), unless `resume="force"`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from train import checkpoint as ckpt_lib
from train import data as data_lib
from train import preemption
from train import steps as steps_lib


class ConfigMismatch(ValueError):
  """A resumed phase whose checkpoint was made under other settings."""


def fingerprint_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
  """`key: old -> new` for every leaf key where two fingerprints differ."""
  out = []
  for k in sorted(set(old) | set(new)):
    a, b = old.get(k, "<absent>"), new.get(k, "<absent>")
    if isinstance(a, dict) and isinstance(b, dict):
      out += fingerprint_diff(a, b, f"{prefix}{k}.")
    elif a != b:
      out.append(f"{prefix}{k}: {_short(a)} -> {_short(b)}")
  return out


def _short(v) -> str:
  s = json.dumps(v)
  return s if len(s) <= 80 else s[:77] + "..."


def fingerprint_of(tree) -> str:
  """A short stable hash of a JSON-able tree (a phase's fingerprint, for its children)."""
  import hashlib

  blob = json.dumps(tree, sort_keys=True, default=str).encode()
  return hashlib.sha256(blob).hexdigest()[:16]


def _onecycle(total_steps: int, first: float, middle: float, last: float, pct_start: float):
  """PyTorch `OneCycleLR`'s two cosine phases (`anneal_strategy="cos"`): `first -> middle`
  over steps `[0, pct_start * total - 1]`, then `middle -> last` up to step `total - 1`."""
  end1 = float(pct_start * total_steps) - 1
  end2 = float(total_steps - 1)

  def anneal(start, end, frac):
    return end + (start - end) / 2 * (jnp.cos(jnp.pi * frac) + 1)

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = anneal(first, middle, jnp.clip(step / max(end1, 1e-9), 0, 1))
    cool = anneal(middle, last, jnp.clip((step - end1) / max(end2 - end1, 1e-9), 0, 1))
    return jnp.where(step <= end1, warm, cool)

  return schedule


def onecycle_lr(total_steps: int, peak: float, pct_start: float = 0.3, div: float = 25.0,
                final_div: float = 1e4):  # fmt: skip
  """PyTorch `OneCycleLR`'s learning rate (its defaults): `peak / div` up to `peak`, then
  down to `peak / div / final_div`."""
  return _onecycle(total_steps, peak / div, peak, peak / div / final_div, pct_start)


def onecycle_momentum(total_steps: int, base: float, peak: float, pct_start: float = 0.3):
  """PyTorch `OneCycleLR`'s momentum (`cycle_momentum=True`, its default, which overrides
  the optimizer's own momentum): `peak` down to `base` while the learning rate warms up,
  then back up to `peak`."""
  return _onecycle(total_steps, peak, base, peak, pct_start)


def make_optimizer(opt: dict, total_steps: int) -> tuple[optax.GradientTransformation, Callable]:
  """SGD with momentum (or adam) + weight decay, under a cosine, step, one-cycle or constant
  schedule.

  `opt` keys: `lr`, `schedule`, `optimizer` ("sgd" or "adam"), `momentum`, `nesterov`
  (default True), `weight_decay` (added to the gradient, as PyTorch's SGD does),
  `boundaries` (the "step" schedule's drops by 10x, as fractions of the run; default
  (0.5, 0.75)), `cycle_momentum` (with "onecycle": `(base, peak)`, PyTorch's default
  (0.85, 0.95); `None` keeps `momentum` fixed). One-cycle is PyTorch's `OneCycleLR` with
  its defaults (`onecycle_lr`: 30% warm-up, initial lr peak/25, final peak/25e4; tested
  against torch)."""
  lr, kind = opt["lr"], opt.get("schedule", "cosine")
  momentum = opt.get("momentum", 0.9)
  if kind == "cosine":
    sched = optax.cosine_decay_schedule(lr, max(total_steps, 1))
  elif kind == "step":
    fracs = tuple(opt.get("boundaries") or (0.5, 0.75))
    bounds = {int(total_steps * f): 0.1 for f in fracs}
    sched = optax.piecewise_constant_schedule(lr, bounds)
  elif kind == "onecycle":
    sched = onecycle_lr(max(total_steps, 1), lr)
    cyc = opt.get("cycle_momentum")
    if cyc:
      momentum = onecycle_momentum(max(total_steps, 1), *cyc)
  elif kind == "constant":
    sched = optax.constant_schedule(lr)
  else:
    raise ValueError(f"schedule: unknown {kind!r}; allowed cosine, step, onecycle, constant.")
  parts = []
  if opt.get("weight_decay", 0.0):
    parts.append(optax.add_decayed_weights(opt["weight_decay"]))
  if opt.get("optimizer", "sgd") == "sgd":
    nesterov = opt.get("nesterov", True)
    if callable(momentum):
      sgd = optax.inject_hyperparams(optax.sgd, static_args=("nesterov",))
      parts.append(sgd(learning_rate=sched, momentum=momentum, nesterov=nesterov))
    else:
      parts.append(optax.sgd(sched, momentum=momentum, nesterov=nesterov))
  else:
    parts.append(optax.adam(sched))
  return optax.chain(*parts), sched


class Logger:
  """JSON lines to `path`; progress on a terminal as one updated line, elsewhere (a log
  file, a pipe) as one printed line per logged step: step, loss, batch accuracy,
  images/s, ETA."""

  def __init__(self, path: str, phase: str, total: int):
    # One writer: with several processes (jax.distributed) only process 0 logs.
    self.path = path if jax.process_index() == 0 else os.devnull
    self.f = open(self.path, "a")
    self.phase, self.total = phase, total
    self.tty = sys.stderr.isatty() and jax.process_index() == 0
    self.plain = not self.tty and jax.process_index() == 0
    self.first = 0
    self.t0 = time.time()

  def log(self, row: dict) -> None:
    for k, v in row.items():
      if isinstance(v, float) and not np.isfinite(v):
        raise FloatingPointError(f"{self.phase}: {k} is {v} at step {row.get('step')}.")
    if self.path != os.devnull and not os.path.exists(self.path):
      # The log was deleted or moved while the run went on: start a new one, and say so.
      self.f.close()
      self.f = open(self.path, "a")
      print(f"[{self.phase}] {self.path} was gone; reopened", file=sys.stderr, flush=True)
    self.f.write(json.dumps({"phase": self.phase, **row}) + "\n")
    self.f.flush()
    if self.tty:
      msg = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())
      sys.stderr.write(f"\r[{self.phase}] {msg[:150]:150s}")
      sys.stderr.flush()
    elif self.plain and "step" in row:
      ips = row.get("images_per_s", 0.0)
      left = self.total - row["step"]
      eta = left * (time.time() - self.t0) / max(row["step"] - self.first, 1) if left else 0
      acc = f" acc {row['accuracy']:.4f}" if "accuracy" in row else ""
      print(
        f"[{self.phase}] step {row['step']}/{self.total} loss {row.get('loss', float('nan')):.4f}"
        f"{acc} {ips:.0f} img/s ETA {eta:.0f} s",
        flush=True,
      )

  def start(self, step: int) -> None:
    """Says where the phase starts (plain output only)."""
    self.first, self.t0 = step, time.time()
    if self.plain:
      what = "done" if step >= self.total else f"from step {step}" if step else "start"
      print(f"[{self.phase}] {what}: {self.total} steps", flush=True)

  def close(self):
    if self.tty:
      sys.stderr.write("\n")
    self.f.close()


def mesh():
  """The run's one-axis device mesh `data` (data parallelism over every device)."""
  # Auto axis: the batch is sharded and XLA propagates the rest (data parallelism); with
  # jax's default Explicit axes every reshape that splits the batch dimension (the layers
  # fold ranks into it) would need its output sharding spelled out.
  return jax.make_mesh((jax.device_count(),), ("data",), axis_types=(AxisType.Auto,))


@functools.lru_cache(maxsize=16)
def local_rows(n: int, sharding: NamedSharding) -> np.ndarray:
  """The rows of an `n`-row batch sharded by `sharding` that this process's devices hold
  (read-only; the same for every batch of a run, so computed once)."""
  index_map = sharding.addressable_devices_indices_map((n,))
  rows = np.arange(n)
  out = np.unique(np.concatenate([rows[ix[0]] for ix in index_map.values()]))
  out.flags.writeable = False
  return out


def read_local(split: data_lib.SplitLike, idx: np.ndarray, sharding: NamedSharding, aug_seed=None):
  """This process's rows of the batch `idx` of `split`: `(rows, images, labels)`. Every
  process computes the same `idx`; each reads only its own rows."""
  rows = local_rows(len(idx), sharding)
  images, labels = split.take(idx[rows], aug_seed)
  return rows, images, labels


def global_batch(n: int, rows: np.ndarray, x: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """The `n`-row global batch, sharded over all devices, of which this process holds rows
  `rows` (`x`, in that order); works unchanged on one host and on many (`jax.distributed`)."""
  where = np.full(n, -1)
  where[rows] = np.arange(len(rows))
  all_rows = np.arange(n)
  return jax.make_array_from_callback(
    (n, *x.shape[1:]), sharding, lambda index: x[where[all_rows[index[0]]]]
  )


def check_batch(batch_size: int) -> None:
  n = jax.device_count()
  if batch_size % n:
    raise ValueError(
      f"batch_size={batch_size} does not divide over the {n} devices; use a multiple of {n}."
    )


_EVAL_STEPS: dict = {}


def evaluate(
  graphdef, params, rest, split: data_lib.SplitLike, cfg: steps_lib.StepConfig, batch: int = 1000
) -> float:
  """Accuracy over a whole split (the last partial batch included), data parallel: each
  batch is sharded over all devices and each process reads only its rows. A batch that
  does not divide over the devices is padded with rows whose label (-1) never counts.

  The jitted eval step is kept per (graph, config), so evaluating the same architecture
  again does not compile again."""
  step = _EVAL_STEPS.get((graphdef, cfg))
  if step is None:
    step = _EVAL_STEPS[(graphdef, cfg)] = steps_lib.make_eval_step(graphdef, cfg)
  m = mesh()
  sharded = NamedSharding(m, P("data"))
  params, rest = jax.device_put((params, rest), NamedSharding(m, P()))
  devices = jax.device_count()
  batch = -(-batch // devices) * devices
  correct, n = 0, split.num_examples
  for i in range(0, n, batch):
    idx = np.arange(i, min(i + batch, n))
    full = np.concatenate([idx, np.full(-len(idx) % devices, idx[-1])])
    rows, images, labels = read_local(split, full, sharded)
    labels = np.where(rows < len(idx), labels, -1).astype(np.int32)
    k = len(full)
    x, y = global_batch(k, rows, images, sharded), global_batch(k, rows, labels, sharded)
    correct += int(step(params, rest, x, y))
  return correct / n


def recalibrate_bn(
  model: nnx.Module,
  split: data_lib.SplitLike,
  cfg: steps_lib.StepConfig,
  *,
  batches: int,
  batch_size: int,
  seed: int,
) -> nnx.Module:
  """A copy of `model` whose BatchNorm running statistics are recomputed at its weights.

  The running statistics of a DeepTwist net were accumulated before its last distortion;
  this replaces them by the average over `batches` training batches (un-augmented, the
  batch order of `seed`) of each batch's statistics, the weights untouched."""
  if batches < 1:
    raise ValueError(f"batches must be >= 1, got {batches}.")
  graphdef, params, rest = steps_lib.split_model(model)
  step = steps_lib.make_recalibrate_step(graphdef, cfg)
  n = split.num_examples
  acc = None
  for b in range(batches):
    idx = data_lib.batch_indices(n, batch_size, seed + 1, b)
    new = step(params, rest, jnp.asarray(split.take(idx)[0]))
    acc = new if acc is None else jax.tree.map(jnp.add, acc, new)
  avg = jax.tree.map(
    lambda a, r: (a / batches).astype(r.dtype) if jnp.issubdtype(r.dtype, jnp.floating) else r,
    acc,
    rest,
  )
  return nnx.merge(graphdef, params, avg)


def run_phase(
  name: str,
  workdir: str,
  model: nnx.Module,
  dataset: data_lib.Dataset,
  *,
  cfg: steps_lib.StepConfig,
  opt: dict,
  steps: int,
  batch_size: int,
  seed: int,
  loss=None,
  teacher: nnx.Module | None = None,
  evaluate: Callable | None = None,
  eval_key: str = "test_accuracy",
  eval_every: int = 0,
  checkpoint_every: int = 200,
  keep: int = 2,
  log_every: int = 50,
  stop_after: int | None = None,
  fingerprint: dict | None = None,
  resume: str = "",
) -> nnx.Module:
  """Trains `model` for `steps` steps in `workdir/name`; returns the trained model.

  `loss`: a `train.steps` loss (default `CrossEntropy`; `BlockMSE` trains only its
  block); `teacher` for the losses that need one. `evaluate(graphdef, params, rest) ->
  accuracy` (on a fixed subset of the evaluated split) is logged as `eval_key` every
  `eval_every` steps and at the end (0: never); it reads the state and changes nothing.
  `fingerprint`: what the caller knows shapes this phase (model, plan, parent phase); the
  optimizer, steps, batch size, seed, loss and step settings are added here.
  `resume="force"` continues from a checkpoint whose fingerprint differs (the caller
  records that). `stop_after` (tests) stops the loop after that many steps of this
  invocation, as a kill would, leaving the checkpoints as they are.

  Each checkpoint keeps `train_s`, the seconds this phase's loop has run over all its
  invocations (`phase_seconds`), so a resumed or re-evaluated run reports its real time.
  """
  check_batch(batch_size)
  loss = loss or steps_lib.CrossEntropy()
  folder = os.path.abspath(os.path.join(workdir, name))
  os.makedirs(folder, exist_ok=True)
  tx, sched = make_optimizer(opt, steps)
  graphdef, state = steps_lib.init_state(model, tx, seed)
  state = jax.tree.map(jnp.copy, state)  # the step donates its state; `model` stays usable
  fp = json.loads(
    json.dumps(
      dict(
        fingerprint or {},
        phase=name,
        opt=dict(opt),
        steps=steps,
        batch_size=batch_size,
        seed=seed,
        mask_block=loss.block,
        step_config={k: v for k, v in dataclasses.asdict(cfg).items() if k != "groups"}
        | loss.fingerprint()
        | {"groups": [[str(lp), list(paths)] for lp, paths in cfg.groups]},
        state_shapes={k: list(v.shape) for k, v in ckpt_lib.named_leaves(state).items()},
      ),
      default=str,
    )
  )
  m = mesh()
  replicated, sharded = NamedSharding(m, P()), NamedSharding(m, P("data"))
  restored = ckpt_lib.restore(folder, state, replicated)
  train_s = 0.0
  if restored is not None:
    state, at, old_fp = restored
    train_s = float(ckpt_lib.info(folder, at).get("train_s", 0.0))
    diff = fingerprint_diff(old_fp or {}, fp)
    if diff and resume != "force":
      shown = diff[:6] + ([f"and {len(diff) - 6} more"] if len(diff) > 6 else [])
      raise ConfigMismatch(
        f"phase {name!r} in {folder} was checkpointed (step {at}) under other settings: "
        + "; ".join(shown)
        + ". Use a new --workdir, or --config.resume=force to continue from it anyway "
        "(recorded in the workdir)."
      )
    if diff:
      print(f"[{name}] resumed under changed settings (resume=force): {'; '.join(diff)}")
  state = jax.device_put(state, replicated)
  step_fn, t_args = _phase_step(graphdef, state, tx, cfg, loss, teacher, replicated)
  logger = Logger(os.path.join(workdir, "metrics.jsonl"), name, steps)
  n = dataset.train.num_examples
  start = int(state.step)
  logger.start(start)
  t_start = t0 = time.time()
  seen = 0

  def read(s):  # batch `s` of this process, read on the host (a pure function of s)
    idx = data_lib.batch_indices(n, batch_size, seed, s)
    return read_local(dataset.train, idx, sharded, (seed, s))

  # The next batch is read while the device runs this one (one reader thread).
  reader = ThreadPoolExecutor(1)
  ahead = reader.submit(read, start) if start < steps else None

  def save(done):
    info = dict(train_s=round(train_s + time.time() - t_start, 1))
    try:
      ckpt_lib.save(folder, done, state, fp, keep=keep, info=info)
    except ckpt_lib.NonFiniteState:
      good = ckpt_lib.steps_on_disk(folder)
      raise FloatingPointError(
        f"{name}: the state is not finite (NaN or Inf) at step {done}; it was not "
        f"saved. The newest checkpoint of this phase is "
        f"{'step ' + str(good[0]) if good else 'none (the phase starts over)'}; rerun "
        "with a lower learning rate (and --config.resume=force to continue from that "
        "checkpoint under the new setting)."
      ) from None

  try:
    for s in range(start, steps):
      if stop_after is not None and s - start >= stop_after:
        return nnx.merge(graphdef, state.params, state.rest)
      if (signum := preemption.requested(s)) is not None:
        if s > 0 and s not in ckpt_lib.steps_on_disk(folder):
          save(s)  # the steps before the signal are kept: a rerun resumes here
        raise preemption.Preempted(name, s, signum)
      rows, images, labels = ahead.result()
      if s + 1 < steps:
        ahead = reader.submit(read, s + 1)
      batch = (
        global_batch(batch_size, rows, images, sharded),
        global_batch(batch_size, rows, labels, sharded),
      )
      state, metrics = step_fn(state, batch, t_args) if t_args else step_fn(state, batch)
      seen += batch_size
      done = s + 1
      row = {}
      if done % log_every == 0 or done == steps:
        row = {k: float(v) for k, v in jax.device_get(metrics).items()}
        dt = time.time() - t0
        row.update(step=done, lr=float(sched(done - 1)), images_per_s=seen / max(dt, 1e-9))
        if cfg.sd:
          row["refused"] = int(state.refused)
          row["distorted"] = bool(steps_lib.is_distortion(done, cfg.sd))
        t0, seen = time.time(), 0
      if evaluate is not None and eval_every and (done % eval_every == 0 or done == steps):
        row.update(step=done, **{eval_key: float(evaluate(graphdef, state.params, state.rest))})
        t0 = time.time()  # the evaluation is not counted in the next images/s
      if row:
        logger.log(row)
      if done % checkpoint_every == 0 or done == steps:
        save(done)
  finally:
    reader.shutdown(cancel_futures=True)
    logger.close()
  return nnx.merge(graphdef, state.params, state.rest)


def _phase_step(graphdef, state, tx, cfg, loss, teacher, replicated):
  """The phase's jitted train step and the teacher's arguments (None without one): the
  loss's block mask applied, the teacher's arrays placed like the state."""
  mask = None
  if loss.block is not None:
    mask = steps_lib.block_mask(state.params, loss.block)
  step_fn = steps_lib.make_train_step(graphdef, tx, cfg, mask, loss=loss)
  t_args = None
  if teacher is not None:
    tg, tp, tr = steps_lib.split_model(teacher)
    t_args = (tg, jax.device_put(tp, replicated), jax.device_put(tr, replicated))
  return step_fn, t_args


def phase_step_runner(
  model: nnx.Module,
  dataset: data_lib.Dataset,
  *,
  cfg: steps_lib.StepConfig,
  opt: dict,
  steps: int,
  batch_size: int,
  seed: int,
  loss=None,
  teacher: nnx.Module | None = None,
) -> Callable[[], None]:
  """A callable that takes one step of the phase `run_phase` would train with these
  arguments (its optimizer, loss, block mask, teacher and batch sharding) on the phase's
  first batch, blocked until ready, the state carried from call to call (the first call
  compiles). Nothing is saved and `model` is not changed."""
  loss = loss or steps_lib.CrossEntropy()
  tx, _ = make_optimizer(opt, steps)
  graphdef, state = steps_lib.init_state(model, tx, seed)
  m = mesh()
  replicated, sharded = NamedSharding(m, P()), NamedSharding(m, P("data"))
  state = jax.device_put(jax.tree.map(jnp.copy, state), replicated)
  step_fn, t_args = _phase_step(graphdef, state, tx, cfg, loss, teacher, replicated)
  idx = data_lib.batch_indices(dataset.train.num_examples, batch_size, seed, 0)
  rows, images, labels = read_local(dataset.train, idx, sharded, (seed, 0))
  batch = (
    global_batch(batch_size, rows, images, sharded),
    global_batch(batch_size, rows, labels, sharded),
  )
  args = (t_args,) if t_args else ()
  box = [state]

  def run():
    box[0], metrics = step_fn(box[0], batch, *args)
    jax.block_until_ready((box[0], metrics))

  return run


def step_seconds(
  model: nnx.Module, dataset: data_lib.Dataset, *, timed: int = 5, warmup: int = 2, **step
) -> float:
  """Median seconds of one step of `phase_step_runner(model, dataset, **step)` (the
  compile and `warmup` steps not counted). For `tnn.choose_forward(step_time=...)`; under
  `jax.distributed` the figure is process 0's, so that every process makes the same
  choice (they run the same programs in turn)."""
  if not isinstance(timed, int) or timed < 1:
    raise ValueError(f"timed must be a positive int, got {timed!r}; allowed range [1, ...].")
  run = phase_step_runner(model, dataset, **step)
  ts = []
  for _ in range(1 + warmup + timed):
    t0 = time.perf_counter()
    run()
    ts.append(time.perf_counter() - t0)
  t = float(np.median(ts[1 + warmup :]))
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    t = float(multihost_utils.broadcast_one_to_all(np.float64(t)))
  return t


def phase_seconds(workdir: str, name: str) -> float:
  """The seconds phase `name` of `workdir` has trained, over all its invocations (its
  newest checkpoint's `train_s`; 0 if it has none)."""
  folder = os.path.abspath(os.path.join(workdir, name))
  on_disk = ckpt_lib.steps_on_disk(folder)
  return float(ckpt_lib.info(folder, on_disk[0]).get("train_s", 0.0)) if on_disk else 0.0
