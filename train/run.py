"""A whole run: dense pretraining, then each compression method from the dense net.

Methods (`config.methods`, in order; `dense` always runs first), each one phase function
of `PHASES` (`fn(ctx, name, section, teacher, plan) -> (model, extra)`; a new method is a
function added there and its config section, `docs/new_method.md`):

- `deeptwist`: train the dense net, distorting the planned kernels every `sd` steps
  (the step count is rounded up to a multiple of `sd`, so the last step is a distortion);
  then convert to the factorized form (`tnn.compress` at the same ranks) and check that
  the test accuracy did not change.
- `finetune`: decompose the dense net (`tnn.compress`), then train the factorized net
  (RSDTR's recipe; DeepTwist's "decomposed-model training" baseline).
- `seqkd`: TNN sequential distillation: compress, then train one block at a time to
  match the teacher's block output from the teacher's block input (MSE), then
  end-to-end on logits (`e2e_steps`).
- `e2ekd`: compress, then distil end-to-end on logits (`alpha`, `temperature`).
- `scratch`: the factorized net from random factors, trained with cross-entropy.

A method may appear several times under its own names: `config.methods` entries that are
not method names name a config section whose `kind` is the method (e.g. `deeptwist_20`
with `kind="deeptwist"`, `ratio=0.2`); rows are labelled by the entry and carry the kind.

DeepTwist's `sd` is given, or estimated from the dense net with `sd_rule="quadratic"`
(`train.sd_rule`; `sd_recover`, `sd_batches`) and written to the row (`sd_estimate`);
`sd_max` (0: none) caps the SD used, for runs shorter than the estimate (the rounded-up
step count is a multiple of SD, so an uncapped large estimate lengthens a short run).
After the last distortion the BatchNorm statistics are recomputed at the distorted
weights (`bn_batches` batches; 0 keeps them) before conversion. For the methods that
start from a decomposition (`finetune`, `seqkd`, `e2ekd`), `bn_batches` recomputes them
right after it, before any training. Their sections' `forward` ("factorized", the
default, or "reconstructed"; `scratch` too) picks the factorized layers' path: the same
function and gradients, a training-speed choice only (`tnn.layers.Factorized`). "auto"
measures it in each phase's own train step (`tnn.choose_forward`; `choose_steps` timed
steps per trial) and keeps the choice in `workdir/<phase>/forward.json` for resumes.

`config.init_from` starts the dense net from a file (a kept teacher `.npz`, or PyTorch
weights of a ResNet: `train.teacher.init_from`); `dense.steps` then trains it further
(0: use it as it is).

Every phase checkpoints in `workdir/<phase>/ckpt`; running the same command again
resumes. Results: `workdir/results.json` (rows `method, params, macs, test_accuracy,
train_s, wall_s`, ...: `train_s` the seconds its phases trained, kept in their
checkpoints across resumes; `wall_s` that plus this run's decomposition and evaluation),
`workdir/metrics.jsonl` (train loss every `log_every` steps, accuracy on the first
`eval_examples` test images every `eval_every` steps, one `result` line per method and
change: re-evaluating a finished workdir adds none), `workdir/accuracy_vs_step.png`,
`workdir/accuracy_vs_params.png`.
"""

from __future__ import annotations

import functools
import json
import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import tnn
from train import checkpoint as ckpt_lib
from train import data as data_lib
from train import steps as steps_lib
from train import teacher as teacher_lib
from train import trainer
from train import workdir as workdir_lib

SD_RULES = ("", "quadratic")
FORWARDS = (*tnn.layers.FORWARDS, "auto")
"""A method section's `forward`: a `tnn.layers.FORWARDS` path for every factorized layer,
or "auto", each phase's choice measured in its own train step (`Context.choose_forward`)."""


def initialize_distributed(**kwargs) -> None:
  """`jax.distributed.initialize(**kwargs)` (no arguments: the cluster from the
  environment), with gloo for collectives between CPU devices of different processes (it
  affects only the CPU client; GPU and TPU collectives are their own). Call it before any
  other jax work."""
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**kwargs)


def method_kind(config, name: str) -> str:
  """The method an entry of `config.methods` runs: its name, or its section's `kind`."""
  sub = config.get(name)
  kind = sub.get("kind", name) if sub is not None else name
  if kind not in PHASES:
    where = f"config.{name}.kind is {kind!r}" if kind != name else "no config section has a kind"
    raise ValueError(
      f"config.methods: unknown method {name!r} ({where}); allowed {tuple(PHASES)}, or a config "
      "section whose `kind` is one of them."
    )
  if kind != "dense" and sub is None:
    raise ValueError(f"config.methods: {name!r} has no config section config.{name}.")
  return kind


_RUN_NUMBERS = (  # (key, smallest allowed, what its smallest value means)
  ("eval_examples", 1, "the number of test images evaluated during training"),
  ("eval_every", 0, "0: no evaluation during training, only the final one"),
  ("log_every", 1, "steps between logged rows"),
  ("checkpoint_every", 1, "steps between checkpoints (and one at every phase's end)"),
  ("keep", 1, "checkpoints kept per phase"),
  ("validation", 0, "0: no hold-out; N: the last N training images held out"),
)


def _in_range(name: str, v, lo, hi, meaning: str = "", *, open_lo=False, open_hi=False) -> None:
  """`ValueError` naming `name`, `v` and the range unless `lo <(=) v <(=) hi` (None: no bound);
  NaN and non-numbers are refused."""
  ok = isinstance(v, (int, float)) and not isinstance(v, bool) and v == v
  if ok and lo is not None:
    ok = v > lo if open_lo else v >= lo
  if ok and hi is not None:
    ok = v < hi if open_hi else v <= hi
  if not ok:
    span = f"{'(' if open_lo else '['}{lo if lo is not None else '-inf'}, "
    span += f"{hi if hi is not None else 'inf'}{')' if open_hi or hi is None else ']'}"
    raise ValueError(
      f"{name} must be in {span}, got {v!r}" + (f" ({meaning})." if meaning else ".")
    )


def _check_section_numbers(m: str, sub) -> None:
  """The numeric keys of method section `m`: the optimizer's and the distillation's."""
  opt = sub.get("opt")
  if opt is not None:
    _in_range(f"config.{m}.opt.lr", opt.get("lr", 0.1), 0, None, open_lo=True)
    _in_range(f"config.{m}.opt.momentum", opt.get("momentum", 0.9), 0, 1, open_hi=True)
    _in_range(f"config.{m}.opt.weight_decay", opt.get("weight_decay", 0.0), 0, None)
  if sub.get("alpha") is not None:
    _in_range(f"config.{m}.alpha", sub.alpha, 0, 1, "the weight of the distillation term")
  if sub.get("temperature") is not None:
    _in_range(f"config.{m}.temperature", sub.temperature, 0, None, open_lo=True)


@functools.cache
def _onednn_status() -> tuple[bool, str]:
  """`tnn.onednn.available()`, asked once per process (a failed build is not retried)."""
  return tnn.onednn.available()


def resolve_cpu_conv(config) -> tuple[str, str]:
  """`(backend, why)` of `config.cpu_conv`: "auto" (the default) is oneDNN where jax runs
  on the CPU and the plugin loads, XLA's convolutions otherwise."""
  asked = config.get("cpu_conv", "auto")
  if asked != "auto":
    return asked, "asked for"
  if jax.default_backend() != "cpu":
    return "xla", f"auto: jax runs on {jax.default_backend()}"
  ok, why = _onednn_status()
  return ("onednn", "auto: the oneDNN plugin is available") if ok else ("xla", f"auto: {why}")


def validate(config) -> None:
  """Every config error that can be found before any compute."""
  if len(set(config.methods)) != len(config.methods):
    raise ValueError(f"config.methods: repeated entries in {tuple(config.methods)}.")
  for m in config.methods:
    kind = method_kind(config, m)
    sub = config.get(m)
    if sub is not None and sub.get("steps", 1) < 0:
      raise ValueError(f"config.{m}.steps must be >= 0, got {sub.steps}.")
    if kind == "deeptwist":
      rule = sub.get("sd_rule", "")
      if rule not in SD_RULES:
        raise ValueError(f"config.{m}.sd_rule: unknown {rule!r}; allowed {SD_RULES}.")
      if not rule and not sub.sd >= 1:
        raise ValueError(f"config.{m}.sd must be >= 1, got {sub.sd}.")
      if not 0 < sub.get("sd_recover", 0.1) < 1:
        raise ValueError(f"config.{m}.sd_recover must be in (0, 1), got {sub.sd_recover}.")
      if sub.get("sd_max", 0) < 0:
        raise ValueError(f"config.{m}.sd_max must be >= 0 (0: no cap), got {sub.sd_max}.")
    if sub is not None and sub.get("forward", "") not in ("", *FORWARDS):
      raise ValueError(f"config.{m}.forward: {sub.forward!r}; allowed {FORWARDS}.")
    if sub is not None and sub.get("choose_steps", 5) < 1:
      raise ValueError(f"config.{m}.choose_steps must be >= 1, got {sub.choose_steps}.")
    if sub is not None and sub.get("bn_batches", 0) < 0:
      raise ValueError(f"config.{m}.bn_batches must be >= 0, got {sub.bn_batches}.")
    if sub is not None:
      _check_section_numbers(m, sub)
  for key, lo, meaning in _RUN_NUMBERS:
    _in_range(f"config.{key}", config.get(key, lo), lo, None, meaning)
  if config.get("eval_on", "test") not in ("test", "validation"):
    raise ValueError(f"config.eval_on: {config.eval_on!r}; allowed 'test', 'validation'.")
  if config.get("eval_on", "test") == "validation" and not config.get("validation", 0):
    raise ValueError(
      "config.eval_on='validation' needs a held-out split: set config.validation=N (the last "
      "N training images; 5000 for Fashion-MNIST)."
    )
  if config.model not in tnn.models.MODELS:
    raise ValueError(
      f"config.model: unknown {config.model!r}; allowed {sorted(tnn.models.MODELS)}."
    )
  if config.batch_size < 1:
    raise ValueError(f"config.batch_size must be >= 1, got {config.batch_size}.")
  trainer.check_batch(config.batch_size)
  if config.get("resume") not in (None, "", "force"):
    raise ValueError(f"config.resume: {config.resume!r}; allowed '' (refuse a mismatch), 'force'.")
  if config.get("require_init_from") and not config.get("init_from"):
    raise ValueError(
      f"config.init_from: this config starts from pretrained weights ({config.model}); pass "
      "--config.init_from=FILE (.safetensors, .pth or a teacher .npz)."
    )
  if config.get("init_from") and not os.path.isfile(config.init_from):
    raise ValueError(f"config.init_from: no file {config.init_from!r}.")
  if config.compute_dtype not in ("float32", "bfloat16"):
    raise ValueError(f"config.compute_dtype: {config.compute_dtype!r}; allowed float32, bfloat16.")
  cpu_conv = config.get("cpu_conv", "auto")
  if cpu_conv not in ("auto", *tnn.ops.CONV_BACKENDS):
    allowed = ", ".join(("auto", *tnn.ops.CONV_BACKENDS))
    raise ValueError(f"config.cpu_conv: {cpu_conv!r}; allowed {allowed}.")
  if cpu_conv == "onednn" and jax.default_backend() == "cpu":
    ok, why = _onednn_status()
    if not ok:
      raise ValueError(f"config.cpu_conv='onednn': {why} Or run with --config.cpu_conv=xla.")


# A method section may hold these `tnn.make_plan` arguments (`overrides` as a JSON string).
_PLAN_KEYS = ("ratio", "eps", "budget", "rule", "layers", "grid", "modes", "overrides")


def _plan_kwargs(c) -> dict:
  """`tnn.make_plan` keyword arguments from a method's config section."""
  kw = {k: c.get(k) for k in _PLAN_KEYS if c.get(k) not in (None, "", ())}
  for k in ("layers", "grid"):
    if k in kw:
      kw[k] = tuple(kw[k])
  if "overrides" in kw:  # a JSON string: layer paths have dots, which ConfigDict refuses
    try:
      kw["overrides"] = json.loads(kw["overrides"])
    except (TypeError, json.JSONDecodeError) as e:
      raise ValueError(f"overrides must be a JSON object string ({e}).") from None
  return kw


def check_plans(config, dense) -> dict:
  """Makes every shape-only plan (ratio/budget) of `config` for `dense` now, so that a
  bad method, ratio, path or rank fails before training; eps/VBMF plans need the trained
  weights and are checked for their arguments only (with a stand-in ratio of 0.5).
  Returns `{method entry: Plan}` of the plans made."""
  plans = {}
  for m in config.methods:
    if method_kind(config, m) == "dense":
      continue
    kw = _plan_kwargs(config[m])
    if "eps" in kw or "rule" in kw:
      kw = {k: v for k, v in kw.items() if k not in ("eps", "rule")} | {"ratio": 0.5}
      if not 0 < config[m].get("eps", 0.5) < 1:
        raise ValueError(f"config.{m}.eps must be in (0, 1), got {config[m].eps}.")
    try:
      plans[m] = tnn.make_plan(dense, config[m].method, **kw)
    except ValueError as e:
      raise ValueError(f"config.{m}: {e}") from None
  return plans


def step_config(config, ds, **kw) -> steps_lib.StepConfig:
  """The train/eval step settings of `config` on data set `ds` (`kw`: DeepTwist's)."""
  return steps_lib.StepConfig(
    num_classes=ds.num_classes,
    mean=tuple(ds.mean),
    std=tuple(ds.std),
    pad_to=config.get("pad_to"),
    crop_pad=config.augment.crop_pad,
    flip=config.augment.flip,
    label_smoothing=config.label_smoothing,
    compute_dtype=config.compute_dtype,
    cpu_conv=resolve_cpu_conv(config)[0],
    **kw,
  )


def run(config, workdir: str, dataset: data_lib.Dataset | None = None) -> list:
  """Runs `config` in `workdir` (resuming what is there); returns the results rows.

  The workdir is locked for the run (`train.workdir.lock`: a second run on it is refused),
  and a config that does not match the workdir's earlier run is refused before any compute
  (`train.workdir.check_config`; each phase also checks its checkpoint's fingerprint)."""
  validate(config)
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() != 0:  # process 0 holds the lock and writes the record
    return _run(config, workdir, dataset)
  with workdir_lib.lock(workdir):
    workdir_lib.check_config(workdir, config)
    return _run(config, workdir, dataset)


def build_model(config, ds) -> nnx.Module:
  """The dense net of `config` for data set `ds`, initialised from `config.seed`."""
  kwargs = dict(config.get("model_kwargs") or {})
  return tnn.models.MODELS[config.model](
    ds.num_classes, rngs=nnx.Rngs(config.seed), in_channels=ds.train.image_shape[2], **kwargs
  )


class Context:
  """What every phase function gets besides its own section: the run's config, data set
  and workdir, and the helpers that train, evaluate and record the same way for every
  method.

  `phase(name, model, c, ...)` is `trainer.run_phase` with the run's settings (steps,
  optimizer and fingerprint from section `c`) and the test-subset evaluation; it also adds
  the phase's training seconds (kept in its checkpoints across resumes) to the method's
  time."""

  def __init__(self, config, ds, workdir: str):
    self.config, self.ds, self.workdir = config, ds, workdir
    self.run_fp = _run_fingerprint(config)
    self.dense_key = trainer.fingerprint_of(
      dict(
        self.run_fp,
        dense=config.dense.to_dict(),
        batch_size=config.batch_size,
        seed=config.seed,
      )
    )
    self.eval_on = config.get("eval_on", "test")
    self.eval_split = ds.validation if self.eval_on == "validation" else ds.test
    self.eval_subset = data_lib.Head(self.eval_split, config.get("eval_examples", 1000))
    self.train_s = self.train_s_now = 0.0

  def step_cfg(self, **kw) -> steps_lib.StepConfig:
    return step_config(self.config, self.ds, **kw)

  def evaluate(self, model, split=None) -> float:
    """Accuracy of `model` on the whole evaluated split (`config.eval_on`: the test split,
    or the held-out validation split), or on `split`."""
    g, p, r = steps_lib.split_model(model)
    return trainer.evaluate(g, p, r, split or self.eval_split, self.step_cfg())

  def _subset_accuracy(self, graphdef, params, rest) -> float:
    return trainer.evaluate(graphdef, params, rest, self.eval_subset, self.step_cfg())

  def phase(self, name, model, c, *, steps=None, cfg=None, loss=None, teacher=None, parent=None):
    """Trains `model` as phase `name` of the method whose config section is `c`."""
    config = self.config
    before = trainer.phase_seconds(self.workdir, name)
    step = dict(
      cfg=cfg or self.step_cfg(),
      loss=loss or steps_lib.CrossEntropy(),
      teacher=teacher,
      opt=dict(c.opt),
      steps=c.get("steps", 0) if steps is None else steps,
      batch_size=config.batch_size,
      seed=config.seed,
    )
    if c.get("forward") == "auto":
      self.choose_forward(name, model, c, step)
    out = trainer.run_phase(
      name,
      self.workdir,
      model,
      self.ds,
      **step,
      evaluate=self._subset_accuracy,
      eval_key=f"{self.eval_on}_accuracy",
      eval_every=config.get("eval_every", 0),
      checkpoint_every=config.checkpoint_every,
      keep=config.keep,
      log_every=config.log_every,
      resume=config.get("resume") or "",
      fingerprint=dict(run=self.run_fp, section=workdir_lib.shaping(c.to_dict()), **(parent or {})),
    )
    after = trainer.phase_seconds(self.workdir, name)
    self.train_s += after
    self.train_s_now += after - before
    return out

  def choose_forward(self, name, model, c, step: dict) -> None:
    """Sets the paths of `model`'s factorized layers for phase `name` (section `forward=
    "auto"`): `tnn.choose_forward` with this phase's own train step as the measure
    (`trainer.step_seconds`, `choose_steps` timed steps per trial), chosen once and kept
    in `workdir/<name>/forward.json`, so that a resumed phase runs the programs it ran
    before. A finished phase is not measured (it trains no more). The choice changes the
    speed only: the paths compute the same function (`tnn.layers.Factorized`)."""
    paths = sorted(
      p for p, m in tnn.plan.layer_paths(model).items() if isinstance(m, tnn.layers.Factorized)
    )
    if not paths:
      return
    file = os.path.join(self.workdir, name, "forward.json")
    stored = _read_forward(file, paths)
    if jax.process_count() > 1:  # every process runs process 0's choice (the same programs)
      stored = _from_process_0(stored, paths)
    if stored is None:
      on_disk = ckpt_lib.steps_on_disk(os.path.join(self.workdir, name))
      if on_disk and on_disk[0] >= step["steps"]:
        return
      t0 = time.time()
      x = self.ds.train.image_shape
      size = (self.config.pad_to,) * 2 if self.config.get("pad_to") else x[:2]
      choice, times = tnn.choose_forward(
        model,
        (self.config.batch_size, *size, x[2]),
        step_time=lambda m: trainer.step_seconds(
          m, self.ds, **step, timed=c.get("choose_steps", 5)
        ),
      )
      stored = dict(choice=choice, step_seconds=times, choose_s=round(time.time() - t0, 1))
      if jax.process_index() == 0:
        os.makedirs(os.path.dirname(file), exist_ok=True)
        tmp = f"{file}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
          json.dump(stored, f, indent=1)
        os.replace(tmp, file)
      n = sum(v == "reconstructed" for v in choice.values())
      print(
        f"[{name}] forward: {n} of {len(choice)} layers through the rebuilt kernel "
        f"({stored['choose_s']} s to choose)",
        flush=True,
      )
    tnn.set_forward(model, stored["choice"])

  def recompute_bn(self, model, c):
    """`model` with BatchNorm statistics recomputed over `c.bn_batches` training batches."""
    return trainer.recalibrate_bn(
      model,
      self.ds.train,
      self.step_cfg(),
      batches=c.bn_batches,
      batch_size=self.config.batch_size,
      seed=self.config.seed,
    )

  def decomposed(self, dense, plan, c, extra):
    """`dense` decomposed by `plan`, its BatchNorm statistics recomputed at the new weights
    when the section asks (`bn_batches`: the dense net's statistics no longer fit the
    factorized convs' outputs). Records the accuracy before and after. The section's
    `forward` (default "factorized") picks the layers' path: speed only, the same function
    (`tnn.layers.Factorized`)."""
    student = tnn.compress(dense, plan, forward=_forward(c))
    extra["accuracy_after_decomposition"] = self.evaluate(student)
    if c.get("bn_batches", 0):
      student = self.recompute_bn(student, c)
      extra["accuracy_after_bn_recalibration"] = self.evaluate(student)
    return student


def _run_fingerprint(config) -> dict:
  """What shapes every phase of a run (each phase adds its own settings)."""
  init_from = config.get("init_from") or ""
  return dict(
    model=config.model,
    model_kwargs=dict(config.get("model_kwargs") or {}),
    dataset=config.dataset,
    image_size=config.get("image_size", 0),
    pad_to=config.get("pad_to"),
    augment=dict(config.augment),
    label_smoothing=config.label_smoothing,
    compute_dtype=config.compute_dtype,
    cpu_conv=config.get("cpu_conv", "auto"),  # as asked: the backends differ by rounding only
    init_from=ckpt_lib.file_sha256(init_from)[:16] if init_from else "",
  )


def _forward(c) -> str:
  """Section `c`'s factorized-layer path to build with (`tnn.layers.FORWARDS`; unset, and
  "auto" until its phase chooses: "factorized")."""
  fw = c.get("forward") or "factorized"
  return "factorized" if fw == "auto" else fw


def _from_process_0(stored: dict | None, paths: list) -> dict | None:
  """Process 0's stored choice (None where it has none), sent to every process."""
  from jax.experimental import multihost_utils

  code = [-1] if stored is None else [tnn.layers.FORWARDS.index(stored["choice"][p]) for p in paths]
  code = np.asarray(code + [-1] * (len(paths) - len(code)), np.int32)
  code = np.asarray(multihost_utils.broadcast_one_to_all(code))
  if code[0] < 0:
    return None
  return dict(
    stored or {}, choice={p: tnn.layers.FORWARDS[int(i)] for p, i in zip(paths, code, strict=True)}
  )


def _read_forward(file: str, paths: list) -> dict | None:
  """The stored forward choice of a phase (None: no file). A file that does not parse, or
  whose choice does not cover exactly the model's factorized layers with known paths, is
  refused, naming the file."""
  if not os.path.exists(file):
    return None
  try:
    with open(file) as f:
      stored = json.load(f)
    choice = stored["choice"]
    ok = sorted(choice) == paths and all(v in tnn.layers.FORWARDS for v in choice.values())
  except (OSError, ValueError, KeyError, TypeError) as e:
    ok, choice = False, e
  if not ok:
    raise ValueError(
      f"{file}: not a forward choice for this phase's factorized layers ({choice!r:.120}); "
      "delete it to choose again (the paths compute the same function)."
    )
  return stored


def _distillation(c) -> steps_lib.Distillation:
  """The logit distillation of section `c` (`alpha`, `temperature`; unset: the defaults of
  `train.steps.Distillation`)."""
  kw = {k: c[k] for k in ("alpha", "temperature") if c.get(k) is not None}
  return steps_lib.Distillation(**kw)


# --- one phase function per method ------------------------------------------------------
# `fn(ctx, name, c, teacher, plan) -> (model, extra)`: `name` is the `config.methods` entry
# (its phases' folder names start with it), `c` its config section, `teacher` the dense
# net, `plan` the `tnn.Plan` made for it; returns the final model and the row's extra
# fields. `dense` is called with `teacher=None, plan=None` and returns the teacher.


def dense_phase(ctx, name, c, teacher, plan):
  """The dense net: from `config.init_from` if set, trained for `dense.steps`."""
  config = ctx.config
  model = build_model(config, ctx.ds)
  check_plans(config, model)
  if config.get("init_from"):
    model = teacher_lib.init_from(model, config.model, config.init_from)
  return ctx.phase(name, model, c), {}


def deeptwist_phase(ctx, name, c, teacher, plan):
  """DeepTwist: the dense net trained with a distortion every SD steps, then converted."""
  groups = steps_lib.distortion_groups(teacher, plan)
  sd, extra = c.get("sd", 0), {}
  if c.get("sd_rule"):
    est = _estimate_sd(ctx.config, ctx.ds, teacher, groups, c)
    extra = {f"sd_{k}": v for k, v in est._asdict().items() if k != "sd"}
    extra["sd_estimate"] = est.sd
    sd = min(est.sd, c.sd_max) if c.get("sd_max") else est.sd  # sd_max: a run's length
  steps = steps_lib.deeptwist_steps(c.steps, sd)
  trained = ctx.phase(
    name,
    nnx.clone(teacher),
    c,
    steps=steps,
    cfg=ctx.step_cfg(sd=sd, groups=groups),
    parent=dict(parent=ctx.dense_key, plan=plan.to_json()),
  )
  extra["accuracy_last_distortion"] = ctx.evaluate(trained)
  if c.get("bn_batches", 0):
    trained = ctx.recompute_bn(trained, c)
    extra["accuracy_before_conversion"] = ctx.evaluate(trained)
  else:
    extra["accuracy_before_conversion"] = extra["accuracy_last_distortion"]
  return tnn.compress(trained, plan), dict(sd=sd, steps=steps, **extra)


def finetune_phase(ctx, name, c, teacher, plan):
  """The decomposed dense net, trained with cross-entropy (RSDTR's recipe)."""
  extra = {}
  student = ctx.decomposed(teacher, plan, c, extra)
  parent = dict(parent=ctx.dense_key, plan=plan.to_json())
  return ctx.phase(name, student, c, parent=parent), extra


def e2ekd_phase(ctx, name, c, teacher, plan):
  """The decomposed dense net, distilled end-to-end on the teacher's logits."""
  extra = {}
  student = ctx.decomposed(teacher, plan, c, extra)
  parent = dict(parent=ctx.dense_key, plan=plan.to_json())
  loss = _distillation(c)
  return ctx.phase(name, student, c, loss=loss, teacher=teacher, parent=parent), extra


def scratch_phase(ctx, name, c, teacher, plan):
  """The same factorized net from random factors, trained with cross-entropy."""
  student = tnn.factorize_random(teacher, plan, nnx.Rngs(ctx.config.seed + 1), forward=_forward(c))
  parent = dict(parent=ctx.dense_key, plan=plan.to_json())
  return ctx.phase(name, student, c, parent=parent), {}


def seqkd_phase(ctx, name, c, teacher, plan):
  """TNN's Seq-KD: one block at a time to the teacher's block output (MSE, only that block
  trains), then `e2e_steps` of logit distillation."""
  extra = {}
  student = ctx.decomposed(teacher, plan, c, extra)
  parent = dict(parent=ctx.dense_key, plan=plan.to_json())
  blocks = sorted({int(p.split(".")[1]) for p in plan.paths if p.startswith("blocks.")})
  for b in blocks:
    student = ctx.phase(
      f"{name}_block{b}",
      student,
      c,
      steps=c.block_steps,
      loss=steps_lib.BlockMSE(b),
      teacher=teacher,
      parent=parent,
    )
  if c.e2e_steps:
    student = ctx.phase(
      f"{name}_e2e",
      student,
      c,
      steps=c.e2e_steps,
      loss=_distillation(c),
      teacher=teacher,
      parent=parent,
    )
  extra["steps"] = len(blocks) * c.block_steps + (c.e2e_steps or 0)  # the row's total
  return student, extra


# kind -> phase function. A new training method is one function added here (from anywhere:
# `PHASES["name"] = fn`) and its config section (`docs/new_method.md`).
PHASES = {
  "dense": dense_phase,
  "deeptwist": deeptwist_phase,
  "finetune": finetune_phase,
  "seqkd": seqkd_phase,
  "e2ekd": e2ekd_phase,
  "scratch": scratch_phase,
}


def _run(config, workdir: str, dataset: data_lib.Dataset | None) -> list:
  ds = dataset
  if ds is None:
    ds = data_lib.load(
      config.dataset,
      config.get("data_dir"),
      image_size=config.get("image_size", 0),
      eval_split=config.get("eval_split", "test"),
    )
  ds = data_lib.hold_out(ds, config.get("validation", 0))
  backend, why = resolve_cpu_conv(config)
  if jax.process_index() == 0:
    print(f"convolutions on the CPU: {backend} ({why.splitlines()[0][:160]})", flush=True)
  image_shape = ds.train.image_shape
  in_shape = (
    1,
    *((config.pad_to,) * 2 if config.get("pad_to") else image_shape[:2]),
    image_shape[2],
  )
  ctx = Context(config, ds, workdir)
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  logged = {m["phase"]: m for m in read_metrics(metrics_path)[0] if m.get("event") == "result"}
  rows = []

  def record(method, model, t0, **extra):
    rep = tnn.report(model, in_shape)
    other_s = time.time() - t0 - ctx.train_s_now  # decomposition, conversion, evaluation
    row = dict(
      method=method,
      params=rep["params"],
      macs=rep["macs"],
      evaluated_on=ctx.eval_on,
      **{f"{ctx.eval_on}_accuracy": ctx.evaluate(model)},
      conv_params=sum(r["params"] for r in rep["layers"] if "Conv" in r["type"]),
      train_s=round(ctx.train_s, 1),
      wall_s=round(ctx.train_s + other_s, 1),
      **extra,
    )
    conv = row["conv_params"]
    row["conv_ratio"] = conv / (rows[0]["conv_params"] if rows else conv)  # rows[0]: dense
    rows.append(row)
    print(json.dumps(row), flush=True)
    old = logged.get(method, {})
    same = all(old.get(k) == row[k] for k in (f"{ctx.eval_on}_accuracy", "params", "train_s"))
    if jax.process_index() == 0 and not same:  # a re-evaluation adds no duplicate row
      with open(metrics_path, "a") as f:
        f.write(json.dumps({"phase": method, "event": "result", **row}) + "\n")

  dense = None
  for method in ("dense", *(m for m in config.methods if m != "dense")):
    kind = method_kind(config, method)
    if kind == "dense" and method != "dense":
      continue
    t0, ctx.train_s, ctx.train_s_now = time.time(), 0.0, 0.0
    c = config[method]
    plan, tag = None, {}
    if kind != "dense":
      plan = tnn.make_plan(dense, c.method, **_plan_kwargs(c))
      with open(os.path.join(workdir, f"plan_{method}.json"), "w") as f:
        f.write(plan.to_json())
      tag = dict(method_detail=c.method) | (dict(kind=kind) if kind != method else {})
    model, extra = PHASES[kind](ctx, method, c, dense, plan)
    if kind == "dense":
      dense = model
    record(method, model, t0, **tag, **extra)

  if jax.process_index() != 0:  # one writer under jax.distributed
    return rows
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(rows, f, indent=1)
  print_table(rows)
  try:
    plots(workdir, rows)
  except (
    ImportError
  ) as e:  # matplotlib is a dependency; a broken install should not lose the results
    print(f"plots skipped: {e}")
  return rows


def _estimate_sd(config, ds, dense, groups, c):
  """DeepTwist SD for `dense` under the planned distortion (`train.sd_rule`), logged."""
  n = ds.train.num_examples
  batches = [
    tuple(jnp.asarray(a) for a in ds.train.take(i))
    for i in (
      data_lib.batch_indices(n, config.batch_size, config.seed + 2, b)
      for b in range(c.get("sd_batches", 4))
    )
  ]
  est = steps_lib.sd_estimate(
    dense,
    step_config(config, ds, groups=groups),
    batches,
    lr=c.opt.lr,
    momentum=c.opt.get("momentum", 0.0) if c.opt.get("optimizer", "sgd") == "sgd" else 0.0,
    recover=c.get("sd_recover", 0.1),
  )
  print(f"DeepTwist SD estimate: {est}", flush=True)
  return est


def accuracy(row: dict) -> float | None:
  """A result or metrics row's accuracy on the split it was evaluated on (`test_accuracy`,
  or `validation_accuracy` under `config.eval_on="validation"`)."""
  return row.get("test_accuracy", row.get("validation_accuracy"))


def print_table(rows) -> None:
  split = rows[0].get("evaluated_on", "test") if rows else "test"
  acc = "val acc" if split == "validation" else "test acc"
  print(f"\n{'method':10s} {'params':>9s} {'conv %':>7s} {'MACs':>11s} {acc:>9s} {'wall s':>7s}")
  for r in rows:
    conv = 100 * r.get("conv_ratio", 1.0)
    print(
      f"{r['method']:10s} {r['params']:9d} {conv:6.1f}% {r['macs']:11d} "
      f"{accuracy(r):9.4f} {r['wall_s']:7.1f}"
    )


def read_metrics(path: str) -> tuple[list, int]:
  """The rows of a metrics file that parse as JSON objects, and how many did not."""
  rows, bad = [], 0
  if not os.path.exists(path):
    return rows, bad
  with open(path, errors="replace") as f:
    for line in f:
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        bad += 1
        continue
      if isinstance(row, dict) and "phase" in row:
        rows.append(row)
      else:
        bad += 1
  return rows, bad


def method_phases(method: str, phases) -> list:
  """The phases of `phases` that belong to `config.methods` entry `method`, in training
  order: the method's own phase, or its Seq-KD blocks then its end-to-end phase."""
  own = [p for p in phases if p == method or re.fullmatch(re.escape(method) + r"_block\d+", p)]
  own.sort(key=lambda p: int(p.rsplit("block", 1)[1]) if p != method else -1)
  return own + [p for p in phases if p == f"{method}_e2e"]


def step_curves(metrics: list, rows: list) -> dict:
  """`{method: [(phase, [step], [test accuracy]), ...]}`: each method's test-subset accuracy
  on one step axis that runs on across its phases (a phase starts where the previous one
  ended). A step logged twice (a resumed run) counts once, the later line."""
  logs = [m for m in metrics if "step" in m and m.get("event") != "result"]
  phases = list(dict.fromkeys(m["phase"] for m in logs))
  out = {}
  for r in rows:
    offset, curves = 0, []
    for p in method_phases(r["method"], phases):
      mine = [m for m in logs if m["phase"] == p]
      acc = dict(sorted({m["step"]: accuracy(m) for m in mine if accuracy(m) is not None}.items()))
      curves.append((p, [offset + s for s in acc], list(acc.values())))
      offset += max(m["step"] for m in mine)
    out[r["method"]] = curves
  return out


def plots(workdir: str, rows: list) -> dict:
  """`accuracy_vs_step.png` (one panel per method: test-subset accuracy on a step axis
  that runs on across the method's phases, the dense net's test accuracy as a dashed
  line, DeepTwist's distortions as grey lines) and `accuracy_vs_params.png` (test accuracy
  against the share of conv parameters kept, in percent; the dense point at 100%).
  Returns the two figures (closed; their data stay readable)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib import ticker

  metrics, bad = read_metrics(os.path.join(workdir, "metrics.jsonl"))
  if bad:
    print(f"metrics.jsonl: {bad} unreadable line(s) skipped in the plots")
  curves = step_curves(metrics, rows)
  dense_acc = accuracy(rows[0]) if rows else None
  n = max(len(rows), 1)
  cols = min(3, n)
  fig, axes = plt.subplots(
    -(-n // cols), cols, figsize=(4.2 * cols, 3.0 * -(-n // cols)), squeeze=False
  )
  for ax in axes.flat[len(rows) :]:
    ax.set_visible(False)
  for ax, r in zip(axes.flat, rows, strict=False):
    for phase, xs, ys in curves.get(r["method"], []):
      if xs:
        ax.plot(xs, ys, marker=".", ms=3, lw=1, label=phase)
    if r.get("kind", r["method"]) == "deeptwist":
      for s in steps_lib.distortion_steps(r["steps"], r["sd"]):
        ax.axvline(s, color="grey", lw=0.4, alpha=0.4, gid="distortion")
    if dense_acc is not None:
      ax.axhline(dense_acc, color="k", ls="--", lw=0.8, label="dense (test)", gid="dense")
    ax.set_title(f"{r['method']}: {accuracy(r):.4f}", fontsize=9)
    ax.set_xlabel("step" + (" (grey: distortions)" if r.get("sd") else ""), fontsize=8)
    ax.set_ylabel("test accuracy (subset)", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=6)
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, "accuracy_vs_step.png"), dpi=110)
  plt.close(fig)
  fig2, ax = plt.subplots(figsize=(5.5, 4))
  for r in rows:
    ax.scatter(100 * r.get("conv_ratio", 1.0), accuracy(r), label=r["method"], s=25)
  if dense_acc is not None:
    ax.axhline(dense_acc, color="k", ls="--", lw=0.8)
  share = [100 * r.get("conv_ratio", 1.0) for r in rows] or [100.0]
  if min(share) < 5:
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(ticker.FixedLocator([1, 2, 5, 10, 20, 50, 100]))
    ax.xaxis.set_major_formatter(ticker.FormatStrFormatter("%g%%"))
  else:
    ax.set_xlim(0, 105)
    ax.xaxis.set_major_formatter(ticker.FormatStrFormatter("%g%%"))
  ax.set_xlabel("conv parameters kept")
  ax.set_ylabel("test accuracy")
  ax.legend(fontsize=7, loc="lower right")
  fig2.tight_layout()
  fig2.savefig(os.path.join(workdir, "accuracy_vs_params.png"), dpi=110)
  plt.close(fig2)
  return {"accuracy_vs_step": fig, "accuracy_vs_params": fig2}
