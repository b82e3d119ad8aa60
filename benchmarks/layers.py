"""Factorized layers against dense: a whole training step, and single layers.

  PYTHONPATH=. python -m benchmarks.layers            # GPU: bf16, batch 1024; CPU: fp32, 32,128
  PYTHONPATH=. python -m benchmarks.layers --only step --steps 20     # the CPU table (README)

1. Training step (forward, backward, SGD update; `train.steps.make_train_step`, the step the
   CLI runs) of the CIFAR ResNet-32, dense and with every 3x3 conv of its residual blocks
   factorized at `--ratio` (default 0.25) of its weights, for Tucker-2, CP, TT and TR
   (`--kinds`: any `tnn.make_plan` method, the m-forms included), each through the
   forward paths `--forward` names (`factorized`, the default, `reconstructed`:
   `tnn.layers.Factorized.forward`, and/or `auto`: each layer the faster of the two,
   measured in this train step at this batch by `tnn.choose_forward` (`--choose-steps`
   timed steps per trial; the arm's row is timed afresh after), the rows give how many
   layers took each path and the seconds the choice took);
   `--dtype` compute (params float32), batch `--batch` (a comma list). Defaults by device:
   on a GPU/TPU bfloat16 at batch 1024, on a CPU float32 at batches 32 and 128.
   images/s = batch / median step time; `vs_dense` is that over the dense images/s of the
   same run. The target is `vs_dense >= 1.0`; rows that miss it say so.
   The peer (`--peer torch`, the default where the `bench` extra is installed;
   `benchmarks.torch_peer`): the same net in eager PyTorch, dense, and with TensorLy-Torch's
   factorized Tucker/CP/TT convs at the same ratio, timed right after ours at the same
   batch, in a process of its own (PyTorch's own process settings); `vs_peer` is ours
   over the peer's images/s (float32 only: the peer runs float32).
2. Single layers: forward + backward (gradients of the factors and of the input) of the
   ResNet-50 3x3 shapes (64@56x56, 128@28x28, 256@14x14, 512@7x7, stride 1) at batch
   `--layer-batch` (64), each kind at `--ratio` against the dense conv.

Factors are random (speed does not depend on their values). Compile time (`first_ms`) is
reported apart; times are medians of `--steps` runs after a warm-up (the train-step arms
of a batch compiled first, then timed round-robin, one step of each per round, so that a
VM whose speed drifts slows them alike), each run blocked until ready. Rows go to `--out`
as JSON lines naming the device; a table is printed last.

On a CPU the process first opts in to `decomp.reuse_host_memory()` (glibc keeps the
buffers XLA frees instead of mapping each step's anew), as the `train` CLI does; the peer's
process keeps glibc's defaults. `--host-memory default` leaves glibc's defaults here too,
for the before/after figure (`reused_host_memory` in the rows).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import decomp
import tnn
from benchmarks import common
from train import steps as steps_lib

KINDS = ("tucker2", "cp", "tt", "tr")
R50_3X3 = ((64, 56), (128, 28), (256, 14), (512, 7))


def _step_rows(args, device: str) -> list:
  rows = []
  for b in args.batch:
    rows += _step_rows_at(args, device, b)
  return rows


def _step_rows_at(args, device: str, batch_size: int) -> list:
  dense = tnn.models.resnet32(10, rngs=nnx.Rngs(0))
  cfg = steps_lib.StepConfig(
    num_classes=10, mean=(0.5,) * 3, std=(0.25,) * 3, compute_dtype=args.dtype
  )
  tx = optax.sgd(0.01, momentum=0.9)
  rng = np.random.default_rng(0)
  batch = (
    jnp.asarray(rng.integers(0, 256, (batch_size, 32, 32, 3), dtype=np.uint8)),
    jnp.asarray(rng.integers(0, 10, (batch_size,), dtype=np.int32)),
  )
  arms = [
    (kind, fw, conv)
    for conv in args.cpu_conv
    for kind, fw in [("dense", None)] + [(k, fw) for k in args.kinds for fw in args.forward]
  ]
  base_cfg, built = cfg, []
  for kind, forward, conv in arms:
    cfg = dataclasses.replace(base_cfg, cpu_conv=conv)
    if kind == "dense":
      model = dense
    else:
      plan = tnn.make_plan(dense, kind, ratio=args.ratio)
      model = tnn.factorize_random(
        dense, plan, nnx.Rngs(1), forward="factorized" if forward == "auto" else forward
      )
    extra = {}
    if forward == "auto":
      t0 = time.perf_counter()
      choice, _ = tnn.choose_forward(
        model,
        (batch_size, 32, 32, 3),
        step_time=lambda m, cfg=cfg: _time_step(m, tx, cfg, batch, args.choose_steps)["median_ms"],
      )
      tnn.set_forward(model, choice)
      extra = dict(
        choose_s=time.perf_counter() - t0,
        layers_by_forward={f: list(choice.values()).count(f) for f in tnn.layers.FORWARDS},
      )
    built.append(
      (
        kind,
        forward,
        conv,
        tnn.report(model, (1, 32, 32, 3)),
        extra,
        _step_fn(model, tx, cfg, batch),
      )
    )
  # every arm compiled, then timed round-robin (`common.timeit_interleaved`)
  times = common.timeit_interleaved(
    {i: b[-1] for i, b in enumerate(built)}, repeats=args.steps, warmup=3
  )
  rows = []
  for i, (kind, forward, conv, rep, extra, _) in enumerate(built):
    t = times[i]
    rows.append(
      dict(
        bench="train_step",
        model="resnet32",
        kind=kind,
        forward=forward,
        cpu_conv=conv,
        ratio=None if kind == "dense" else args.ratio,
        dtype=args.dtype,
        batch=batch_size,
        params=rep["params"],
        macs_per_image=rep["macs"],
        images_per_s=batch_size / (t["median_ms"] / 1e3),
        device=device,
        reused_host_memory=args.reused_host_memory,
        **extra,
        **t,
      )
    )
  dense_ips = {r["cpu_conv"]: r["images_per_s"] for r in rows if r["kind"] == "dense"}
  for r in rows:
    r["vs_dense"] = r["images_per_s"] / dense_ips[r["cpu_conv"]]
    r["meets_target"] = r["kind"] == "dense" or r["vs_dense"] >= 1.0
  if args.peer == "torch":
    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    version, peer = _peer(kinds, batch_size, args.steps, args.ratio)
    for r in rows:
      if r["kind"] in peer:
        ms, first_ms, n = peer[r["kind"]]
        r["peer"] = f"torch {version} eager channels_last" + (
          "" if r["kind"] == "dense" else " + tltorch FactorizedConv (factorized)"
        )
        r["peer_images_per_s"] = batch_size / (ms / 1e3)
        r["peer_first_ms"], r["peer_params"] = first_ms, n
        r["vs_peer"] = r["images_per_s"] / r["peer_images_per_s"]
  return rows


def _step_fn(model, tx, cfg, batch):
  """A call of the jitted train step of `model` on `batch`, blocked until ready (the state
  carried from call to call)."""
  graphdef, state = steps_lib.init_state(model, tx, 0)
  state = jax.tree.map(jnp.copy, state)
  step = steps_lib.make_train_step(graphdef, tx, cfg)
  box = [state]

  def run():
    box[0], metrics = step(box[0], batch)
    jax.block_until_ready(metrics)

  return run


def _time_step(model, tx, cfg, batch, steps: int) -> dict:
  """`common.timeit` of the jitted train step of `model` (`steps` timed calls after 3)."""
  return common.timeit(_step_fn(model, tx, cfg, batch), repeats=steps, warmup=3)


def _peer(kinds, batch: int, steps: int, ratio: float):
  """The PyTorch peer's step rows, timed right after ours in a process of its own
  (`python -m benchmarks.torch_peer`): it runs with PyTorch's own process settings
  (glibc's malloc defaults), not the ones this process chose for XLA."""
  cmd = [sys.executable, "-m", "benchmarks.torch_peer", "--kinds", ",".join(kinds)]
  cmd += ["--batch", str(batch), "--steps", str(steps), "--ratio", str(ratio)]
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  out = subprocess.run(
    cmd, cwd=root, env=dict(env, PYTHONPATH=root), capture_output=True, text=True
  )
  if out.returncode:
    raise SystemExit(f"benchmarks.torch_peer failed:\n{out.stderr[-2000:]}")
  got = json.loads(out.stdout.strip().splitlines()[-1])
  return got["torch"], {k: tuple(v) for k, v in got["rows"].items()}


def _layer(kind, c, ratio, dtype):
  """A factorized 3x3 conv `c -> c` at `ratio` (the plan's rank rule), random factors."""
  w_shape = (3, 3, c, c)
  rec = tnn.methods.get_method(kind)
  lp = rec.ratio_plan(w_shape, ratio)
  cls = rec.layer_class(conv=True)
  return cls(c, c, (3, 3), *rec.hyper(lp), use_bias=False, dtype=dtype, rngs=nnx.Rngs(0))


def _layer_rows(args, device: str) -> list:
  dtype = jnp.dtype(args.dtype)
  rows = []
  for c, hw in R50_3X3:
    shape_rows = []
    x = jax.random.normal(jax.random.key(0), (args.layer_batch, hw, hw, c), dtype)
    for kind in ("dense", *args.kinds):
      if kind == "dense":
        w = jax.random.normal(jax.random.key(1), (3, 3, c, c), jnp.float32) / math.sqrt(9 * c)
        params, macs, n = w, tnn.ops.conv_macs(x.shape, w.shape), w.size

        def fwd(p, x):
          return tnn.ops.conv(x, p.astype(x.dtype))
      else:
        layer = _layer(kind, c, args.ratio, dtype)
        graphdef, params = nnx.split(layer)
        macs, n = layer.macs(x.shape), layer.num_params()

        def fwd(p, x, graphdef=graphdef):
          return nnx.merge(graphdef, p)(x)

      @jax.jit
      def fwd_bwd(p, x, fwd=fwd):
        def loss(p, x):
          return jnp.sum(jnp.square(fwd(p, x).astype(jnp.float32)))

        return jax.grad(loss, argnums=(0, 1))(p, x)

      t = common.timeit(
        lambda f=fwd_bwd, p=params, x=x: jax.block_until_ready(f(p, x)),
        repeats=args.steps,
        warmup=3,
      )
      shape_rows.append(
        dict(
          bench="layer_fwd_bwd",
          shape=f"3x3 {c}->{c} @{hw}x{hw}",
          kind=kind,
          ratio=None if kind == "dense" else args.ratio,
          dtype=args.dtype,
          batch=args.layer_batch,
          params=int(n),
          macs=int(macs),
          device=device,
          reused_host_memory=args.reused_host_memory,
          **t,
        )
      )
    for r in shape_rows:  # the first row of each shape is the dense conv
      r["vs_dense"] = shape_rows[0]["median_ms"] / r["median_ms"]
    rows += shape_rows
  return rows


def main(argv=None):
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--batch", default="", help="comma list (default by device, see above)")
  p.add_argument("--layer-batch", type=int, default=64)
  p.add_argument("--steps", type=int, default=50)
  p.add_argument("--choose-steps", type=int, default=8, help="timed steps per trial of auto")
  p.add_argument("--ratio", type=float, default=0.25)
  p.add_argument("--dtype", default="", choices=("", "bfloat16", "float32"))
  p.add_argument("--peer", default="auto", choices=("auto", "torch", "none"))
  p.add_argument("--kinds", default=",".join(KINDS))
  p.add_argument(
    "--forward", default="factorized", help="comma list: factorized,reconstructed,auto"
  )
  p.add_argument(
    "--cpu-conv",
    default="xla,onednn",
    help="comma list of train-step arms' convolutions on the CPU (tnn.ops.CONV_BACKENDS)",
  )
  p.add_argument("--only", default="", choices=("", "step", "layer"))
  p.add_argument("--out", default="benchmarks/results/layers.jsonl")
  p.add_argument(
    "--host-memory",
    default="reuse",
    choices=("reuse", "default"),
    help="reuse: decomp.reuse_host_memory() first (CPU only); default: glibc's defaults",
  )
  args = p.parse_args(argv)
  # Before jax starts. The PyTorch peer's own process (`_peer`) keeps glibc's defaults.
  args.reused_host_memory = args.host_memory == "reuse" and decomp.reuse_host_memory()
  args.kinds = tuple(k for k in args.kinds.split(",") if k)
  args.forward = tuple(f for f in args.forward.split(",") if f)
  args.cpu_conv = tuple(c for c in args.cpu_conv.split(",") if c)
  for c in args.cpu_conv:
    if c not in tnn.ops.CONV_BACKENDS:
      p.error(f"--cpu-conv: {c!r}; allowed {tnn.ops.CONV_BACKENDS}")
  bad = [f for f in args.forward if f not in (*tnn.layers.FORWARDS, "auto")]
  if bad:
    p.error(f"--forward: {bad[0]!r}; allowed {(*tnn.layers.FORWARDS, 'auto')}")
  allowed = tuple(m for m, r in tnn.methods.METHODS.items() if r.conv is not None)  # a layer
  for k in args.kinds:
    if k not in allowed:
      p.error(f"--kinds: unknown {k!r}; allowed {allowed}")
  cpu = jax.default_backend() == "cpu"
  args.dtype = args.dtype or ("float32" if cpu else "bfloat16")
  args.batch = tuple(int(b) for b in (args.batch or ("32,128" if cpu else "1024")).split(","))
  if args.peer == "auto":
    from benchmarks import torch_peer

    why = torch_peer.available()
    args.peer = "none" if why or args.dtype != "float32" else "torch"
    if why:
      print(f"no peer: {why}")
  device = common.device_name()
  rows = []
  if args.only in ("", "step"):
    rows += _step_rows(args, device)
  if args.only in ("", "layer"):
    rows += _layer_rows(args, device)
  common.write_jsonl(args.out, rows)
  print(f"\ndevice: {device}, dtype {args.dtype}, ratio {args.ratio}")
  for r in rows:
    if r["bench"] == "train_step":
      flag = "" if r["meets_target"] else "  MISSES the 1.0x-dense target"
      peer = (
        f"  peer {r['peer_images_per_s']:7.1f} img/s  {r['vs_peer']:5.2f}x peer"
        if "vs_peer" in r
        else ""
      )
      print(
        f"train step resnet32 {r['kind']:8s} {r['forward'] or '':11s} {r['cpu_conv']:6s}"
        f" batch {r['batch']:5d}"
        f" {r['images_per_s']:8.1f} img/s"
        f"  {r['vs_dense']:5.2f}x dense{peer}  params {r['params']:8d}"
        f"  compile {r['first_ms'] / 1e3:6.1f} s{flag}"
      )
    else:
      print(
        f"layer {r['shape']:22s} {r['kind']:8s} fwd+bwd {r['median_ms']:8.3f} ms"
        f"  {r['vs_dense']:5.2f}x dense  params {r['params']:8d}  MACs {r['macs']:12d}"
      )


if __name__ == "__main__":
  main()
