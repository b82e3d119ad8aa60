"""Where a train step's time goes: XLA's own profile of the CIFAR ResNet-32 step, by op.

  PYTHONPATH=. python -m benchmarks.step_profile --batch 32 --cpu-conv onednn [--kind tucker2]

The step of `benchmarks.layers` (forward, backward, SGD with momentum; `--kind` one
`tnn.make_plan` method at `--ratio`, or dense), compiled and warmed up, then `--steps` steps
traced with `jax.profiler` (a Perfetto trace, read back here). The executed ops' time is
summed by group: the oneDNN custom calls (forward, input gradient, kernel gradient),
BatchNorm's reductions as tensorial's CPU kernels (`tnn.onednn.batch_sums`), XLA's
YNNPACK fusions (its CPU convolutions and dots, and elementwise work fused with them), other
convolutions, dots, transposes/copies, and the other fusions (BatchNorm, ReLU, the optimizer:
elementwise and reductions). Per step, in ms, with the step's wall time beside
them; the ops of the two XLA worker threads can overlap, so their sum may exceed it.
A JSON line goes to `--out`.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import tempfile
import time

import decomp


def _group(name: str) -> str:
  n = name.lower()
  for key, group in (
    ("tensorial_onednn_conv_fwd", "onednn forward"),
    ("tensorial_onednn_conv_bwd_data", "onednn input gradient"),
    ("tensorial_onednn_conv_bwd_weights", "onednn kernel gradient"),
    ("tensorial_bn_", "batchnorm sums (tensorial)"),
    ("ffi_call", "onednn (other)"),
    ("ynn", "xla ynnpack (convs, dots)"),  # XLA's CPU convolutions and dots run as YNNPACK fusions
    ("convolution", "xla convolution"),
    ("conv", "xla convolution"),
    ("dot", "xla dot"),
    ("transpose", "transpose/copy"),
    ("copy", "transpose/copy"),
  ):
    if key in n:
      return group
  return "other fusions"


def main(argv=None):
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--kind", default="dense")
  p.add_argument("--ratio", type=float, default=0.25)
  p.add_argument("--cpu-conv", default="onednn", choices=("xla", "onednn"))
  p.add_argument("--top", type=int, default=0, help="also print the N costliest ops")
  p.add_argument("--out", default="benchmarks/results/step_profile-cpu.jsonl")
  args = p.parse_args(argv)
  decomp.reuse_host_memory()  # as the CLI and the layers benchmark do

  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from flax import nnx

  import tnn
  from benchmarks import common
  from train import steps as steps_lib

  model = tnn.models.resnet32(10, rngs=nnx.Rngs(0))
  if args.kind != "dense":
    plan = tnn.make_plan(model, args.kind, ratio=args.ratio)
    model = tnn.factorize_random(model, plan, nnx.Rngs(1))
  cfg = steps_lib.StepConfig(
    num_classes=10, mean=(0.5,) * 3, std=(0.25,) * 3, cpu_conv=args.cpu_conv
  )
  tx = optax.sgd(0.01, momentum=0.9)
  graphdef, state = steps_lib.init_state(model, tx, 0)
  step = steps_lib.make_train_step(graphdef, tx, cfg)
  rng = np.random.default_rng(0)
  batch = (
    jnp.asarray(rng.integers(0, 256, (args.batch, 32, 32, 3), dtype=np.uint8)),
    jnp.asarray(rng.integers(0, 10, (args.batch,), dtype=np.int32)),
  )
  state = jax.tree.map(jnp.copy, state)
  for _ in range(3):
    state, m = step(state, batch)
  jax.block_until_ready(m)
  walls = []
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d, create_perfetto_trace=True):
      for _ in range(args.steps):
        t0 = time.perf_counter()
        state, m = step(state, batch)
        jax.block_until_ready(m)
        walls.append(time.perf_counter() - t0)
    (path,) = glob.glob(os.path.join(d, "**", "perfetto_trace.json.gz"), recursive=True)
    with gzip.open(path) as f:
      events = json.load(f)
  events = events["traceEvents"] if isinstance(events, dict) else events
  # which custom call each `ffi_call.N` op is, from the compiled program's text
  targets = {}
  for line in step.lower(state, batch).compile().as_text().splitlines():
    if "custom_call_target=" in line and "=" in line:
      name = line.strip().removeprefix("ROOT ").split(" = ")[0].lstrip("%")
      targets[name] = line.split('custom_call_target="')[1].split('"')[0]
  by = collections.Counter()
  per_op = collections.Counter()
  for e in events:
    args_ = e.get("args") or {}
    # executed ops (thunks) only: the spans the thunk executor names after their HLO op
    if e.get("ph") != "X" or "hlo_op" not in args_ or e.get("name", "").startswith("end:"):
      continue
    op = args_["hlo_op"]
    by[_group(targets.get(op, op))] += e["dur"] / 1e3 / args.steps
    per_op[op] += e["dur"] / 1e3 / args.steps
  wall = float(np.median(walls)) * 1e3
  row = dict(
    bench="step_profile",
    model="resnet32",
    kind=args.kind,
    ratio=None if args.kind == "dense" else args.ratio,
    cpu_conv=args.cpu_conv,
    batch=args.batch,
    step_ms=wall,
    ms_per_step={k: round(v, 2) for k, v in by.most_common()},
    device=common.device_name(),
    date=time.strftime("%F", time.gmtime()),
  )
  common.write_jsonl(args.out, [row])
  print(f"{args.kind} {args.cpu_conv} batch {args.batch}: step {wall:.1f} ms", end="")
  print(f" (median of {args.steps})")
  for k, v in by.most_common():
    print(f"  {k:24s} {v:8.2f} ms/step")
  for op, v in [(o, v) for o, v in per_op.most_common() if o not in targets][: args.top]:
    print(f"  {v:8.2f} ms  {op}  {targets.get(op, '')}")


if __name__ == "__main__":
  main()
