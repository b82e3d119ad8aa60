"""RSDTR's own claim with no training: at equal eps, the shift-and-split search stores fewer
numbers than TR-SVD at shift 0, on a trained teacher's kernels.

  PYTHONPATH=. python -m benchmarks.rsdtr_storage --teacher teachers/cnn_fmnist.npz \
      --eps 0.3,0.5,0.9

For every planned kernel (the papers' default layers: every spatial conv but the stem) and
every eps: the storage of `decomp.rsdtr` (all 4 circular shifts x every split of the first
rank, the smallest kept); of TR-SVD at shift 0 with the most balanced split (Zhao et al.'s
algorithm as commonly run, `decomp.tr_svd` in the ring order `(S, d_h, d_w, T)`); and of
the dense kernels. Both meet the same bound `rel_error <= eps` (checked here). Rows go to
`--out` as JSON lines; a table is printed.
"""

from __future__ import annotations

import argparse
import time

import jax.numpy as jnp
import numpy as np

import decomp
import tnn
from benchmarks import common
from train import teacher as teacher_lib

RING = (2, 0, 1, 3)  # HWIO kernel -> ring order (S, d_h, d_w, T)


def main(argv=None):
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--teacher", default="teachers/cnn_fmnist.npz")
  p.add_argument("--eps", default="0.3,0.5,0.9")
  p.add_argument("--out", default="benchmarks/results/rsdtr-storage.jsonl")
  a = p.parse_args(argv)
  decomp.reuse_host_memory()
  model = teacher_lib.load(a.teacher)
  plan = tnn.make_plan(model, "tr", ratio=0.5)  # only for its (default) layer paths
  layers = tnn.layer_paths(model)
  kernels = [np.asarray(layers[q].kernel[...]) for q in plan.paths]
  dense = sum(k.size for k in kernels)
  rows = []
  for eps in (float(e) for e in a.eps.split(",")):
    t0 = time.perf_counter()
    found = decomp.rsdtr_many(kernels, eps=eps)
    t_search = time.perf_counter() - t0
    ours = plain = 0
    for k, f in zip(kernels, found, strict=True):
      assert float(decomp.rel_error(jnp.asarray(k), f)) <= eps + 1e-5
      ours += decomp.num_params(f)
      tr0 = decomp.tr_svd(jnp.transpose(jnp.asarray(k), RING), eps=eps)
      assert float(decomp.rel_error(jnp.transpose(jnp.asarray(k), RING), tr0)) <= eps + 1e-5
      plain += decomp.num_params(tr0)
    rows.append(
      dict(
        bench="rsdtr_storage",
        teacher=a.teacher,
        kernels=len(kernels),
        eps=eps,
        dense=int(dense),
        rsdtr=int(ours),
        shift0_balanced=int(plain),
        rsdtr_vs_shift0=ours / plain,
        rsdtr_share_of_dense=ours / dense,
        search_s=t_search,
        device=common.device_name(),
        date=time.strftime("%F", time.gmtime()),
      )
    )
  common.write_jsonl(a.out, rows)
  print(f"{a.teacher}: {len(kernels)} kernels, {dense} numbers dense")
  for r in rows:
    print(
      f"eps {r['eps']:.2f}: RSDTR {r['rsdtr']:8d} "
      f"({100 * r['rsdtr_share_of_dense']:5.1f}% of dense)"
      f"  shift 0 {r['shift0_balanced']:8d}  ratio {r['rsdtr_vs_shift0']:.3f}"
    )


if __name__ == "__main__":
  main()
