"""A whole run: dense pretraining, then each compression method from the dense net.

Methods (`config.methods`, in order; `dense` always runs first):

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
right after it, before any training.

`config.init_from` starts the dense net from a file (a kept teacher `.npz`, or PyTorch
weights of a ResNet: `train.teacher.init_from`); `dense.steps` then trains it further
(0: use it as it is).

Every phase checkpoints in `workdir/<phase>/ckpt`; running the same command again
resumes. Results: `workdir/results.json` (rows `method, params, macs, test_accuracy`, ...),
`workdir/metrics.jsonl`, `workdir/accuracy_vs_step.png`, `workdir/accuracy_vs_params.png`.
"""

from __future__ import annotations

import json
import math
import os
import time

import jax
import jax.numpy as jnp
from flax import nnx

import tnn
from train import checkpoint as ckpt_lib
from train import data as data_lib
from train import steps as steps_lib
from train import teacher as teacher_lib
from train import trainer
from train import workdir as workdir_lib

METHODS = ("dense", "deeptwist", "finetune", "seqkd", "e2ekd", "scratch")


SD_RULES = ("", "quadratic")


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
  if kind not in METHODS:
    where = f"config.{name}.kind is {kind!r}" if kind != name else "no config section has a kind"
    raise ValueError(
      f"config.methods: unknown method {name!r} ({where}); allowed {METHODS}, or a config "
      "section whose `kind` is one of them."
    )
  if kind != "dense" and sub is None:
    raise ValueError(f"config.methods: {name!r} has no config section config.{name}.")
  return kind


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
    if sub is not None and sub.get("bn_batches", 0) < 0:
      raise ValueError(f"config.{m}.bn_batches must be >= 0, got {sub.bn_batches}.")
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


def _step_cfg(config, ds, **kw) -> steps_lib.StepConfig:
  return steps_lib.StepConfig(
    num_classes=ds.num_classes,
    mean=tuple(ds.mean),
    std=tuple(ds.std),
    pad_to=config.get("pad_to"),
    crop_pad=config.augment.crop_pad,
    flip=config.augment.flip,
    label_smoothing=config.label_smoothing,
    compute_dtype=config.compute_dtype,
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


def _run(config, workdir: str, dataset: data_lib.Dataset | None) -> list:
  ds = dataset
  if ds is None:
    ds = data_lib.load(
      config.dataset,
      config.get("data_dir"),
      image_size=config.get("image_size", 0),
      eval_split=config.get("eval_split", "test"),
    )
  image_shape = ds.train.image_shape
  in_shape = (
    1,
    *((config.pad_to,) * 2 if config.get("pad_to") else image_shape[:2]),
    image_shape[2],
  )
  init_from = config.get("init_from") or ""
  # What shapes every phase of this run (each phase adds its own settings).
  run_fp = dict(
    model=config.model,
    model_kwargs=dict(config.get("model_kwargs") or {}),
    dataset=config.dataset,
    image_size=config.get("image_size", 0),
    pad_to=config.get("pad_to"),
    augment=dict(config.augment),
    label_smoothing=config.label_smoothing,
    compute_dtype=config.compute_dtype,
    init_from=ckpt_lib.file_sha256(init_from)[:16] if init_from else "",
  )
  dense_key = trainer.fingerprint_of(
    dict(run_fp, dense=config.dense.to_dict(), batch_size=config.batch_size, seed=config.seed)
  )

  def common(name, **fp):
    c = config[name]
    return dict(
      opt=dict(c.opt),
      steps=c.get("steps", 0),
      batch_size=config.batch_size,
      seed=config.seed,
      checkpoint_every=config.checkpoint_every,
      keep=config.keep,
      log_every=config.log_every,
      resume=config.get("resume") or "",
      fingerprint=dict(run=run_fp, section=c.to_dict(), **fp),
    )

  def evaluate(model):
    g, p, r = steps_lib.split_model(model)
    return trainer.evaluate(g, p, r, ds.test, _step_cfg(config, ds))

  rows = []

  def _recalibrated(student, c, extra):
    """A decomposed net, its BatchNorm statistics recomputed at its new weights when the
    section asks (`bn_batches`): the dense net's statistics no longer fit the
    factorized convs' outputs. Records the accuracy before and after."""
    extra["accuracy_after_decomposition"] = evaluate(student)
    if not c.get("bn_batches", 0):
      return student
    student = _recomputed_bn(student, c)
    extra["accuracy_after_bn_recalibration"] = evaluate(student)
    return student

  def _recomputed_bn(model, c):
    """`model` with BatchNorm statistics recomputed over `c.bn_batches` training batches."""
    return trainer.recalibrate_bn(
      model,
      ds.train,
      _step_cfg(config, ds),
      batches=c.bn_batches,
      batch_size=config.batch_size,
      seed=config.seed,
    )

  def record(method, model, t0, **extra):
    rep = tnn.report(model, in_shape)
    row = dict(
      method=method,
      params=rep["params"],
      macs=rep["macs"],
      test_accuracy=evaluate(model),
      conv_params=sum(r["params"] for r in rep["layers"] if "Conv" in r["type"]),
      wall_s=round(time.time() - t0, 1),
      **extra,
    )
    conv = row["conv_params"]
    row["conv_ratio"] = conv / (rows[0]["conv_params"] if rows else conv)  # rows[0]: dense
    rows.append(row)
    print(json.dumps(row), flush=True)
    if jax.process_index() == 0:  # the phase's summary in the metrics stream too
      with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps({"phase": method, "event": "result", **row}) + "\n")
    return row

  t0 = time.time()
  dense = build_model(config, ds)
  check_plans(config, dense)
  if init_from:
    dense = teacher_lib.init_from(dense, config.model, init_from)
  dense = trainer.run_phase(
    "dense", workdir, dense, ds, cfg=_step_cfg(config, ds), **common("dense")
  )
  record("dense", dense, t0)

  for method in config.methods:
    kind = method_kind(config, method)
    if kind == "dense":
      continue
    t0 = time.time()
    c = config[method]
    plan = tnn.make_plan(dense, c.method, **_plan_kwargs(c))
    with open(os.path.join(workdir, f"plan_{method}.json"), "w") as f:
      f.write(plan.to_json())
    child = dict(parent=dense_key, plan=plan.to_json())
    tag = (
      dict(kind=kind, method_detail=c.method) if kind != method else dict(method_detail=c.method)
    )
    if kind == "deeptwist":
      groups = steps_lib.distortion_groups(dense, plan)
      sd, extra = c.get("sd", 0), {}
      if c.get("sd_rule"):
        est = _estimate_sd(config, ds, dense, groups, c)
        extra = {f"sd_{k}": v for k, v in est._asdict().items() if k != "sd"}
        extra["sd_estimate"] = est.sd
        sd = min(est.sd, c.sd_max) if c.get("sd_max") else est.sd  # sd_max: a run's length
      steps = math.ceil(c.steps / sd) * sd  # the last step is a distortion
      cfg = _step_cfg(config, ds, sd=sd, groups=groups)
      com = common(method, **child) | {"steps": steps}
      trained = trainer.run_phase(method, workdir, nnx.clone(dense), ds, cfg=cfg, **com)
      extra["accuracy_last_distortion"] = evaluate(trained)
      if c.get("bn_batches", 0):
        trained = _recomputed_bn(trained, c)
        extra["accuracy_before_conversion"] = evaluate(trained)
      else:
        extra["accuracy_before_conversion"] = extra["accuracy_last_distortion"]
      final = tnn.compress(trained, plan)
      record(method, final, t0, **tag, sd=sd, steps=steps, **extra)
    elif kind in ("finetune", "e2ekd", "scratch"):
      extra = {}
      if kind == "scratch":
        student = tnn.factorize_random(dense, plan, nnx.Rngs(config.seed + 1))
      else:
        student = _recalibrated(tnn.compress(dense, plan), c, extra)
      kd = kind == "e2ekd"
      cfg = _step_cfg(
        config,
        ds,
        loss="kd" if kd else "ce",
        alpha=c.get("alpha", 0.9),
        temperature=c.get("temperature", 4.0),
      )
      final = trainer.run_phase(
        method,
        workdir,
        student,
        ds,
        cfg=cfg,
        teacher=dense if kd else None,
        **common(method, **child),
      )
      record(method, final, t0, **tag, **extra)
    elif kind == "seqkd":
      extra = {}
      student = _recalibrated(tnn.compress(dense, plan), c, extra)
      blocks = sorted({int(p.split(".")[1]) for p in plan.paths if p.startswith("blocks.")})
      for b in blocks:
        cfg = _step_cfg(config, ds, loss="block", block=b)
        com = common(method, **child) | {"steps": c.block_steps}
        student = trainer.run_phase(
          f"{method}_block{b}", workdir, student, ds, cfg=cfg, teacher=dense, mask_block=b, **com
        )
      if c.e2e_steps:
        cfg = _step_cfg(
          config, ds, loss="kd", alpha=c.get("alpha", 0.9), temperature=c.get("temperature", 4.0)
        )
        com = common(method, **child) | {"steps": c.e2e_steps}
        student = trainer.run_phase(
          f"{method}_e2e", workdir, student, ds, cfg=cfg, teacher=dense, **com
        )
      record(method, student, t0, **tag, **extra)

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
    _step_cfg(config, ds, groups=groups),
    batches,
    lr=c.opt.lr,
    momentum=c.opt.get("momentum", 0.0) if c.opt.get("optimizer", "sgd") == "sgd" else 0.0,
    recover=c.get("sd_recover", 0.1),
  )
  print(f"DeepTwist SD estimate: {est}", flush=True)
  return est


def print_table(rows) -> None:
  print(
    f"\n{'method':10s} {'params':>9s} {'conv %':>7s} {'MACs':>11s} {'test acc':>9s} {'wall s':>7s}"
  )
  for r in rows:
    conv = 100 * r.get("conv_ratio", 1.0)
    print(
      f"{r['method']:10s} {r['params']:9d} {conv:6.1f}% {r['macs']:11d} "
      f"{r['test_accuracy']:9.4f} {r['wall_s']:7.1f}"
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


def plots(workdir: str, rows: list) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  metrics, bad = read_metrics(os.path.join(workdir, "metrics.jsonl"))
  if bad:
    print(f"metrics.jsonl: {bad} unreadable line(s) skipped in the plots")
  fig, ax = plt.subplots(figsize=(7, 4))
  for phase in sorted({m["phase"] for m in metrics}):
    pts = [(m["step"], m["accuracy"]) for m in metrics if m["phase"] == phase and "accuracy" in m]
    if pts:
      ax.plot(*zip(*pts, strict=True), label=phase)
  for r in rows:
    if r.get("kind", r["method"]) == "deeptwist":
      for s in range(r["sd"], r["steps"] + 1, r["sd"]):
        ax.axvline(s, color="grey", lw=0.5, alpha=0.5)
  ax.set_xlabel("step (grey: DeepTwist distortions)")
  ax.set_ylabel("train accuracy (batch)")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, "accuracy_vs_step.png"), dpi=120)
  plt.close(fig)
  fig, ax = plt.subplots(figsize=(5, 4))
  for r in rows:
    ax.scatter(r["params"], r["test_accuracy"])
    ax.annotate(r["method"], (r["params"], r["test_accuracy"]), fontsize=8)
  ax.set_xscale("log")
  ax.set_xlabel("parameters")
  ax.set_ylabel("test accuracy")
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, "accuracy_vs_params.png"), dpi=120)
  plt.close(fig)
