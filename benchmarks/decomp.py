"""Whole-network decomposition benchmark: tensorial vs TensorLy and the paper's RSDTR.

  PYTHONPATH=. python -m benchmarks.decomp [--nets resnet32,resnet50] [--out results/decomp.jsonl]
  PYTHONPATH=. python -m benchmarks.decomp --nets resnet32,teachers/resnet20_fmnist.npz

For every conv kernel of a CIFAR ResNet-32 and an ImageNet ResNet-50 (the real shapes,
random He-normal weights, float32):

- Tucker-2, ranks a quarter of the channels: decompose + reconstruct, i.e. one DeepTwist
  distortion. Ours: one jitted function, kernels of one shape vmapped together.
  Peer: TensorLy `partial_tucker` (numpy backend, HOSVD init, no iterations), per kernel.
- Lowered SVD, rank a quarter of `min(T, S d^2)`: ours jitted+vmapped; peer TensorLy
  `svd_interface` on each lowered matrix.
- RSDTR at eps 0.3 and 0.5: ours `decomp.rsdtr_many`; peer the paper's loop
  (`benchmarks.paper_rsdtr`: shifts x splits, one float32 numpy SVD at a time).

A `--nets` entry ending in `.npz` is a kept teacher (`teachers/`): every conv kernel of
the trained net, the stem included, instead of random ones (net `teacher:<file name>`).
Trained kernels have decaying spectra and random ones do not, so at the same eps RSDTR
stores far fewer numbers on them and the errors at fixed ranks are smaller.

BLAS threads: numpy, TensorLy and jaxlib's CPU LAPACK kernels call OpenBLAS, whose
threading of small problems costs more than it gains on few cores. `decomp.rsdtr` limits
it to one thread itself (`decomp._blas`); the rest runs with OpenBLAS's default unless
`--blas-threads N` limits everything (ours and the peers) to N. Rows record the peers'
count (`blas_threads`).

Times: our first call (compile + run) apart, then the median of `--repeats` runs; the
peers' median of `--peer-repeats` runs. Errors: the network's relative error
`sqrt(sum ||K - K^||^2 / sum ||K||^2)`. Rows go to the JSON lines file, device named.
"""

from __future__ import annotations

import argparse
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

import decomp
from benchmarks import common, paper_rsdtr, shapes

SWEEPS = {"sweep": {"n_sweeps": 2}, "sweep_os": {"n_sweeps": 1, "oversample": 4}}
"""The `decomp.tucker2_sweep` settings that `--methods` can name (Tucker-2 only)."""

NETS = {"resnet32": lambda: shapes.resnet_cifar(32), "resnet50": shapes.resnet50}


def _kernels(shape_list, seed=0):
  rng = np.random.default_rng(seed)
  out = []
  for s in shape_list:
    fan_in = s[0] * s[1] * s[2]
    out.append((rng.standard_normal(s) * math.sqrt(2 / fan_in)).astype(np.float32))
  return out


def teacher_kernels(path: str) -> list:
  """Every conv kernel (HWIO, float32) of the kept teacher at `path`, in layer order."""
  import tnn
  from train import teacher as teacher_lib

  model = teacher_lib.load(path)
  out = []
  for m in tnn.layer_paths(model).values():
    k = getattr(m, "kernel", None)
    if k is not None and k[...].ndim == 4:
      out.append(np.asarray(k[...], np.float32))
  return out


def net_kernels(net: str) -> tuple[str, list]:
  """(row name, kernels) of a `--nets` entry: a random net of `NETS`, or a teacher file."""
  if net.endswith(".npz"):
    return f"teacher:{os.path.basename(net)}", teacher_kernels(net)
  if net not in NETS:
    raise SystemExit(f"--nets: unknown {net!r}; allowed {sorted(NETS)} or a teacher .npz file")
  return net, _kernels(NETS[net]())


def _groups(kernels):
  by_shape: dict = {}
  for i, k in enumerate(kernels):
    by_shape.setdefault(k.shape, []).append(i)
  return list(by_shape.items())


def _net_error(kernels, approx):
  num = sum(
    float(np.sum((np.float64(k) - np.float64(a)) ** 2))
    for k, a in zip(kernels, approx, strict=True)
  )
  den = sum(float(np.sum(np.float64(k) ** 2)) for k in kernels)
  return math.sqrt(num / den)


def tucker2_ranks(shape):
  return max(1, shape[2] // 4), max(1, shape[3] // 4)


def lowered_rank(shape):
  return max(1, min(shape[3], shape[0] * shape[1] * shape[2]) // 4)


def make_distortion(kernels, method, which, compiler_options=None):
  """One jitted function: every kernel decomposed and reconstructed, vmapped per shape
  (compiled with `compiler_options`)."""
  groups = _groups(kernels)
  stacks = [jnp.stack([jnp.asarray(kernels[i]) for i in idx]) for _, idx in groups]

  def one(k):
    if which == "tucker2" and method in SWEEPS:
      return decomp.reconstruct(decomp.tucker2_sweep(k, tucker2_ranks(k.shape), **SWEEPS[method]))
    if which == "tucker2":
      return decomp.reconstruct(decomp.tucker2(k, tucker2_ranks(k.shape), method=method))
    return decomp.reconstruct(decomp.lowered_svd(k, lowered_rank(k.shape), method=method))

  fn = jax.jit(lambda xs: [jax.vmap(one)(x) for x in xs], compiler_options=compiler_options)

  def run():
    return jax.block_until_ready(fn(stacks))

  def approx():
    out = [None] * len(kernels)
    for (_, idx), ys in zip(groups, run(), strict=True):
      for i, y in zip(idx, np.asarray(ys), strict=True):
        out[i] = y
    return out

  return run, approx


def tensorly_tucker2(kernels):
  import tensorly as tl
  from tensorly.decomposition import partial_tucker

  out = []
  for k in kernels:
    (core, factors), _ = partial_tucker(
      k, rank=list(tucker2_ranks(k.shape)), modes=[2, 3], init="svd", n_iter_max=0
    )
    out.append(tl.tenalg.multi_mode_dot(core, factors, modes=[2, 3]))
  return out


def tensorly_lowered(kernels):
  from tensorly.tenalg.svd import svd_interface

  out = []
  for k in kernels:
    w = np.asarray(decomp.lowered(jnp.asarray(k)))
    u, s, v = svd_interface(w, n_eigenvecs=lowered_rank(k.shape))
    out.append(np.asarray(decomp.unlowered(jnp.asarray((u * s) @ v), k.shape)))
  return out


def _time_host(fn, repeats):
  times, result = [], None
  for _ in range(repeats):
    t0 = time.perf_counter()
    result = fn()
    times.append(time.perf_counter() - t0)
  return 1e3 * float(np.median(times)), result


def _blas_threads():
  """Threads of the BLAS libraries loaded now (numpy's and scipy's OpenBLAS)."""
  import threadpoolctl

  counts = {i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"}
  return counts.pop() if len(counts) == 1 else sorted(counts)


def bench_net(net, args, device):
  net, kernels = net_kernels(net)
  rows = []
  base = {
    "net": net,
    "kernels": len(kernels),
    "device": device,
    "jax": jax.__version__,
    "date": time.strftime("%Y-%m-%d", time.gmtime()),
    "blas_threads": _blas_threads(),
  }
  dense = sum(k.size for k in kernels)
  for which, peer_fn, peer_name in (
    ("tucker2", tensorly_tucker2, "tensorly"),
    ("lowered_svd", tensorly_lowered, "tensorly"),
  ):
    if which not in args.tasks:
      continue
    peer_ms, peer_out = _time_host(lambda f=peer_fn: f(kernels), args.peer_repeats)
    peer_err = _net_error(kernels, peer_out)
    for method in args.methods:
      if method in SWEEPS and which != "tucker2":
        continue  # the eigensolver-free route exists for Tucker-2 only
      run, approx = make_distortion(kernels, method, which)
      t = common.timeit(run, repeats=args.repeats)
      rows.append(
        {
          **base,
          "task": which,
          "method": method,
          "ours_ms": t["median_ms"],
          "compile_ms": t["first_ms"] - t["median_ms"],
          "peer": peer_name,
          "peer_ms": peer_ms,
          "speedup": peer_ms / t["median_ms"],
          "ours_error": _net_error(kernels, approx()),
          "peer_error": peer_err,
          "repeats": args.repeats,
          "peer_repeats": args.peer_repeats,
        }
      )
      print(_fmt(rows[-1]), flush=True)
      common.write_jsonl(args.out, rows[-1:])
  for eps in args.eps if "rsdtr" in args.tasks else ():
    peer_ms, peer = None, None
    if args.paper_repeats:  # 0: ours only (the loop takes minutes on ResNet-50's kernels)
      peer_ms, peer = _time_host(
        lambda e=eps: [paper_rsdtr.rsdtr(k, e) for k in kernels], args.paper_repeats
      )
    for method in (m for m in args.methods if m not in SWEEPS):
      t0 = time.perf_counter()
      decomp.rsdtr_many(kernels, eps=eps, method=method)  # compiles
      first = 1e3 * (time.perf_counter() - t0)
      ours_ms, res = _time_host(
        lambda e=eps, m=method: decomp.rsdtr_many(kernels, eps=e, method=m), args.rsdtr_repeats
      )
      out = [np.asarray(decomp.reconstruct(r)) for r in res]
      row = {
        **base,
        "task": f"rsdtr_eps{eps}",
        "method": method,
        "ours_ms": ours_ms,
        "compile_ms": first - ours_ms,
        "peer": "paper (numpy f32 loop)",
        "peer_ms": peer_ms,
        "speedup": None,
        "ours_error": _net_error(kernels, out),
        "peer_error": None,
        "ours_storage": sum(r.num_params() for r in res),
        "peer_storage": None,
        "dense_storage": dense,
        "kernels_larger_than_peer": None,
        "repeats": args.rsdtr_repeats,
        "peer_repeats": args.paper_repeats,
      }
      if peer is not None:
        row.update(
          speedup=peer_ms / ours_ms,
          peer_error=_net_error(kernels, [paper_rsdtr.tr_to_kernel(p[2]) for p in peer]),
          peer_storage=sum(p[0] for p in peer),
          kernels_larger_than_peer=sum(
            r.num_params() > p[0] for r, p in zip(res, peer, strict=True)
          ),
        )
      rows.append(row)
      print(_fmt(rows[-1]), flush=True)
      common.write_jsonl(args.out, rows[-1:])
  return rows


def _fmt(r):
  s = (
    f"{r['net']:9s} {r['task']:14s} {r['method']:5s} ours {r['ours_ms']:9.1f} ms "
    f"(compile {r['compile_ms'] / 1e3:5.1f} s)  "
  )
  if r["peer_ms"] is None:
    return s + f"(no peer run)  err {r['ours_error']:.4f}  storage {r['ours_storage']}"
  s += (
    f"{r['peer']}: {r['peer_ms']:9.1f} ms  "
    f"x{r['speedup']:6.1f}  err {r['ours_error']:.4f} vs {r['peer_error']:.4f}"
  )
  if "ours_storage" in r:
    s += f"  storage {r['ours_storage']} vs {r['peer_storage']} (dense {r['dense_storage']})"
  return s


def main():
  decomp.reuse_host_memory()  # the same
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--nets", default="resnet32", help="resnet32,resnet50 or a teacher .npz")
  p.add_argument(
    "--methods",
    default="gram,svd,sweep,sweep_os",
    help="sweep: tucker2_sweep, 2 sweeps; sweep_os: 1 sweep, oversample 4",
  )
  p.add_argument("--tasks", default="tucker2,lowered_svd,rsdtr")
  p.add_argument("--eps", default="0.3,0.5")
  p.add_argument("--repeats", type=int, default=20)
  p.add_argument("--rsdtr-repeats", type=int, default=3)
  p.add_argument("--peer-repeats", type=int, default=3)
  p.add_argument("--paper-repeats", type=int, default=1, help="0: no paper loop (ours only)")
  p.add_argument("--blas-threads", type=int, default=0, help="0: OpenBLAS's default")
  p.add_argument("--out", default="results/decomp.jsonl")
  args = p.parse_args()
  args.methods = args.methods.split(",")
  args.tasks = args.tasks.split(",")
  args.eps = [float(e) for e in args.eps.split(",") if e]
  device = common.device_name()
  print(f"device: {device}, jax {jax.__version__}, XLA threads: {os.cpu_count()}", flush=True)
  import contextlib

  import scipy.linalg  # noqa: F401  (loads every BLAS the runs use, so that a limit covers it)
  import threadpoolctl

  limit = (
    threadpoolctl.threadpool_limits(args.blas_threads, user_api="blas")
    if args.blas_threads
    else contextlib.nullcontext()
  )
  rows = []
  with limit:
    for net in args.nets.split(","):
      rows += bench_net(net, args, device)
  print(f"\nwrote {len(rows)} rows to {args.out}")


if __name__ == "__main__":
  main()
