"""A study arm's train step, factorized against `forward="auto"`, timed in the same run.

  PYTHONPATH=. python -m benchmarks.train_forward \\
      --config train/configs/fidelity_resnet20.py:0.1 --method rsdtr

The arm (a method section of kind `finetune`, `e2ekd` or `scratch`) is built as the
`train` CLI builds it: the config's teacher (`init_from`), its plan (`--plan FILE`, a
`plan_<method>.json` that a run wrote, skips an eps search), the decomposed net (random
factors for `scratch`), its loss, optimizer and first batch (`train.trainer.
phase_step_runner`). `forward="auto"` chooses the paths as a run does
(`tnn.choose_forward` with `train.trainer.step_seconds`, `--choose-steps` timed steps per
trial); then both arms are compiled and timed round-robin (`common.timeit_interleaved`,
`--steps` steps each). The row: images/s of each, their ratio, the layers per path and
the seconds the choice took. The process opts in to the CPU settings the `train` CLI
takes (`decomp.reuse_host_memory`). Factors' values do
not change the speed, so the row is the speed of the run's steps.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time

import jax
from flax import nnx

import decomp
import tnn
from benchmarks import common
from train import data as data_lib
from train import run as run_lib
from train import steps as steps_lib
from train import teacher as teacher_lib
from train import trainer

KINDS = ("finetune", "e2ekd", "scratch")


def load_config(spec: str):
  path, _, arg = spec.partition(":")
  mod_spec = importlib.util.spec_from_file_location("study_config", path)
  mod = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(mod)
  return mod.get_config(arg or None)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--config", required=True, help="FILE[:ARG], as the train CLI takes it")
  p.add_argument("--method", required=True, help=f"a method section of kind {KINDS}")
  p.add_argument("--plan", default="", help="a plan JSON (plan_<method>.json of a run)")
  p.add_argument("--data-dir", default="")
  p.add_argument("--steps", type=int, default=10, help="timed steps per arm")
  p.add_argument("--choose-steps", type=int, default=5)
  p.add_argument("--out", default="benchmarks/results/train_forward-cpu.jsonl")
  args = p.parse_args(argv)
  decomp.reuse_host_memory()
  config = load_config(args.config)
  if args.method not in config:
    p.error(f"--method {args.method!r}: no such section in {args.config}")
  c = config[args.method]
  kind = run_lib.method_kind(config, args.method)
  if kind not in KINDS:
    p.error(f"--method {args.method!r} is of kind {kind!r}; allowed {KINDS}")
  for n, v in (("--steps", args.steps), ("--choose-steps", args.choose_steps)):
    if v < 1:
      p.error(f"{n} must be >= 1, got {v}")
  ds = data_lib.load(
    config.dataset,
    args.data_dir or config.get("data_dir") or None,
    image_size=config.get("image_size", 0),
  )
  teacher = run_lib.build_model(config, ds)
  if config.get("init_from"):
    teacher = teacher_lib.init_from(teacher, config.model, config.init_from)
  if args.plan:
    with open(args.plan) as f:
      plan = tnn.Plan.from_json(f.read())
  else:
    plan = tnn.make_plan(teacher, c.method, **run_lib._plan_kwargs(c))
  if kind == "scratch":
    student = tnn.factorize_random(teacher, plan, nnx.Rngs(config.seed + 1))
  else:
    student = tnn.compress(teacher, plan)
  step = dict(
    cfg=run_lib.step_config(config, ds),
    loss=run_lib._distillation(c) if kind == "e2ekd" else steps_lib.CrossEntropy(),
    teacher=teacher if kind == "e2ekd" else None,
    opt=dict(c.opt),
    steps=c.steps,
    batch_size=config.batch_size,
    seed=config.seed,
  )
  x = ds.train.image_shape
  size = (config.pad_to,) * 2 if config.get("pad_to") else x[:2]
  t0 = time.perf_counter()
  choice, _ = tnn.choose_forward(
    student,
    (config.batch_size, *size, x[2]),
    step_time=lambda m: trainer.step_seconds(m, ds, **step, timed=args.choose_steps),
  )
  choose_s = time.perf_counter() - t0
  auto = tnn.set_forward(nnx.clone(student), choice)
  tnn.set_forward(student, "factorized")
  runs = {
    fw: trainer.phase_step_runner(m, ds, **step)
    for fw, m in (("factorized", student), ("auto", auto))
  }
  times = common.timeit_interleaved(runs, repeats=args.steps, warmup=2)
  ips = {fw: config.batch_size / (t["median_ms"] / 1e3) for fw, t in times.items()}
  row = dict(
    bench="train_forward",
    config=args.config,
    method=args.method,
    kind=kind,
    decomposition=c.method,
    batch=config.batch_size,
    images_per_s_factorized=ips["factorized"],
    images_per_s_auto=ips["auto"],
    auto_vs_factorized=ips["auto"] / ips["factorized"],
    layers_by_forward={f: list(choice.values()).count(f) for f in tnn.layers.FORWARDS},
    choose_s=round(choose_s, 1),
    steps=args.steps,
    times=times,
    device=common.device_name(),
    jax=jax.__version__,
    date=time.strftime("%F", time.gmtime()),
  )
  common.write_jsonl(args.out, [row])
  print(json.dumps(row))
  return row


if __name__ == "__main__":
  main()
