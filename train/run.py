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

Every phase checkpoints in `workdir/<phase>/ckpt`; running the same command again
resumes. Results: `workdir/results.json` (rows `method, params, macs, test_accuracy`, ...),
`workdir/metrics.jsonl`, `workdir/accuracy_vs_step.png`, `workdir/accuracy_vs_params.png`.
"""

from __future__ import annotations

import json
import math
import os
import time

from flax import nnx

import tnn
from train import data as data_lib
from train import steps as steps_lib
from train import trainer

METHODS = ("dense", "deeptwist", "finetune", "seqkd", "e2ekd", "scratch")


def validate(config) -> None:
  """Every config error that can be found before any compute."""
  for m in config.methods:
    if m not in METHODS:
      raise ValueError(f"config.methods: unknown method {m!r}; allowed {METHODS}.")
  if config.model not in tnn.models.MODELS:
    raise ValueError(
      f"config.model: unknown {config.model!r}; allowed {sorted(tnn.models.MODELS)}."
    )
  if "deeptwist" in config.methods and not config.deeptwist.sd >= 1:
    raise ValueError(f"config.deeptwist.sd must be >= 1, got {config.deeptwist.sd}.")
  for name in ("dense", "deeptwist", "finetune", "seqkd", "e2ekd", "scratch"):
    sub = config.get(name)
    if sub is not None and sub.get("steps", 1) < 0:
      raise ValueError(f"config.{name}.steps must be >= 0, got {sub.steps}.")
  if config.batch_size < 1:
    raise ValueError(f"config.batch_size must be >= 1, got {config.batch_size}.")
  trainer.check_batch(config.batch_size)
  if config.compute_dtype not in ("float32", "bfloat16"):
    raise ValueError(f"config.compute_dtype: {config.compute_dtype!r}; allowed float32, bfloat16.")


def _plan_kwargs(c) -> dict:
  kw = {"ratio": c.get("ratio"), "eps": c.get("eps"), "budget": c.get("budget")}
  kw = {k: v for k, v in kw.items() if v is not None}
  if c.get("rule"):
    kw["rule"] = c.rule
  return kw


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
  """Runs `config` in `workdir` (resuming what is there); returns the results rows."""
  validate(config)
  os.makedirs(workdir, exist_ok=True)
  ds = dataset if dataset is not None else data_lib.load(config.dataset, config.get("data_dir"))
  in_shape = (
    1,
    *((config.pad_to,) * 2 if config.get("pad_to") else ds.train.images.shape[1:3]),
    ds.train.images.shape[3],
  )
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json(indent=1))

  def common(name):
    c = config[name]
    return dict(
      opt=dict(c.opt),
      steps=c.get("steps", 0),
      batch_size=config.batch_size,
      seed=config.seed,
      checkpoint_every=config.checkpoint_every,
      keep=config.keep,
      log_every=config.log_every,
    )

  def evaluate(model):
    g, p, r = steps_lib.split_model(model)
    return trainer.evaluate(g, p, r, ds.test, _step_cfg(config, ds))

  rows = []

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
    rows.append(row)
    print(json.dumps(row), flush=True)
    return row

  t0 = time.time()
  kwargs = dict(config.get("model_kwargs") or {})
  dense = tnn.models.MODELS[config.model](
    ds.num_classes, rngs=nnx.Rngs(config.seed), in_channels=ds.train.images.shape[3], **kwargs
  )
  dense = trainer.run_phase(
    "dense", workdir, dense, ds, cfg=_step_cfg(config, ds), **common("dense")
  )
  dense_row = record("dense", dense, t0)
  dense_conv = dense_row["conv_params"]

  for method in config.methods:
    if method == "dense":
      continue
    t0 = time.time()
    c = config[method]
    plan = tnn.make_plan(dense, c.method, **_plan_kwargs(c))
    with open(os.path.join(workdir, f"plan_{method}.json"), "w") as f:
      f.write(plan.to_json())
    if method == "deeptwist":
      sd = c.sd
      steps = math.ceil(c.steps / sd) * sd  # the last step is a distortion
      cfg = _step_cfg(config, ds, sd=sd, groups=steps_lib.distortion_groups(dense, plan))
      com = common(method) | {"steps": steps}
      trained = trainer.run_phase(method, workdir, nnx.clone(dense), ds, cfg=cfg, **com)
      acc_dense_form = evaluate(trained)
      final = tnn.compress(trained, plan)
      row = record(
        method, final, t0, method_detail=c.method, sd=sd, accuracy_before_conversion=acc_dense_form
      )
    elif method in ("finetune", "e2ekd", "scratch"):
      if method == "scratch":
        student = tnn.factorize_random(dense, plan, nnx.Rngs(config.seed + 1))
      else:
        student = tnn.compress(dense, plan)
      if method == "finetune":
        acc0 = evaluate(student)
      kd = method == "e2ekd"
      cfg = _step_cfg(
        config,
        ds,
        loss="kd" if kd else "ce",
        alpha=c.get("alpha", 0.9),
        temperature=c.get("temperature", 4.0),
      )
      final = trainer.run_phase(
        method, workdir, student, ds, cfg=cfg, teacher=dense if kd else None, **common(method)
      )
      extra = {"accuracy_after_decomposition": acc0} if method == "finetune" else {}
      row = record(method, final, t0, method_detail=c.method, **extra)
    elif method == "seqkd":
      student = tnn.compress(dense, plan)
      acc0 = evaluate(student)
      blocks = sorted({int(p.split(".")[1]) for p in plan.paths if p.startswith("blocks.")})
      for b in blocks:
        cfg = _step_cfg(config, ds, loss="block", block=b)
        com = common(method) | {"steps": c.block_steps}
        student = trainer.run_phase(
          f"seqkd_block{b}", workdir, student, ds, cfg=cfg, teacher=dense, mask_block=b, **com
        )
      if c.e2e_steps:
        cfg = _step_cfg(
          config, ds, loss="kd", alpha=c.get("alpha", 0.9), temperature=c.get("temperature", 4.0)
        )
        com = common(method) | {"steps": c.e2e_steps}
        student = trainer.run_phase(
          "seqkd_e2e", workdir, student, ds, cfg=cfg, teacher=dense, **com
        )
      row = record(method, student, t0, method_detail=c.method, accuracy_after_decomposition=acc0)
    row["conv_ratio"] = row["conv_params"] / dense_conv

  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(rows, f, indent=1)
  print_table(rows)
  try:
    plots(workdir, rows, config)
  except (
    ImportError
  ) as e:  # matplotlib is a dependency; a broken install should not lose the results
    print(f"plots skipped: {e}")
  return rows


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


def plots(workdir: str, rows: list, config) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    metrics = [json.loads(line) for line in f]
  fig, ax = plt.subplots(figsize=(7, 4))
  for phase in sorted({m["phase"] for m in metrics}):
    pts = [(m["step"], m["accuracy"]) for m in metrics if m["phase"] == phase and "accuracy" in m]
    if pts:
      ax.plot(*zip(*pts, strict=True), label=phase)
  if "deeptwist" in config.methods:
    steps = [m["step"] for m in metrics if m["phase"] == "deeptwist"]
    sd = config.deeptwist.sd
    for s in range(sd, (max(steps) if steps else 0) + 1, sd):
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
