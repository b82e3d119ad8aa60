"""Pure tensor decompositions for compressing conv kernels (jax + numpy only).

Conv kernels are Flax kernels `(d_h, d_w, S, T)`. Every decomposition is a public
wrapper that checks its arguments (`ValueError` naming the argument, value and range)
over a private jitted kernel with static ranks; the factor types are pytrees that work
under `jit` and `vmap`. `method="gram"` (default) computes leading singular subspaces
from `eigh` of the small Gram matrix; `method="svd"` is the exact reference.
"""

from decomp._xla_cpu import reuse_host_memory
from decomp.cp import cp_als
from decomp.factors import CP, TR, TT, LowRank, Tiled, Tucker, num_params, reconstruct, rel_error
from decomp.lowrank import lowered, lowered_svd, tiled_svd, tiled_svd_rank, unlowered
from decomp.ranks import (
  cp_rank,
  lowered_svd_rank,
  lowered_svd_rank_eps,
  tr_ranks,
  tt_ranks,
  tucker2_params,
  tucker2_ranks,
  tucker2_ranks_eps,
  tucker2_ranks_vbmf,
  vbmf_rank,
)
from decomp.rsdtr import RSDTR, rsdtr, rsdtr_many, rsdtr_stack, tr_storage
from decomp.tt_tr import tr_max_ranks, tr_svd, tt_max_ranks, tt_svd
from decomp.tucker import hooi, hosvd, tucker2, tucker2_sweep

__all__ = [
  "CP",
  "RSDTR",
  "TR",
  "TT",
  "LowRank",
  "Tiled",
  "Tucker",
  "cp_als",
  "cp_rank",
  "hooi",
  "hosvd",
  "lowered",
  "lowered_svd",
  "lowered_svd_rank",
  "lowered_svd_rank_eps",
  "num_params",
  "reconstruct",
  "rel_error",
  "reuse_host_memory",
  "rsdtr",
  "rsdtr_many",
  "rsdtr_stack",
  "tiled_svd",
  "tiled_svd_rank",
  "tr_max_ranks",
  "tr_ranks",
  "tr_storage",
  "tr_svd",
  "tt_max_ranks",
  "tt_ranks",
  "tt_svd",
  "tucker2",
  "tucker2_params",
  "tucker2_ranks",
  "tucker2_ranks_eps",
  "tucker2_ranks_vbmf",
  "tucker2_sweep",
  "unlowered",
  "vbmf_rank",
]
