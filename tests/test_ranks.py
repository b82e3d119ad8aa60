"""Rank rules: ratios met and maximal; eps rules meet eps; VBMF finds planted ranks."""

import math

import numpy as np
import pytest
import scipy.optimize

import decomp
from decomp import ranks as rr
from tests import reference as ref

KERNELS = [(3, 3, 16, 16), (3, 3, 64, 128), (1, 1, 256, 64), (5, 5, 3, 32)]


@pytest.mark.parametrize("shape", KERNELS)
@pytest.mark.parametrize("ratio", [0.05, 0.25, 0.5])
def test_ratio_rules_keep_at_most_ratio(shape, ratio):
  size = math.prod(shape)
  d_h, d_w, s, t = shape
  r_s, r_t = decomp.tucker2_ranks(shape, ratio=ratio)
  if (r_s, r_t) != (1, 1):
    assert decomp.tucker2_params(shape, (r_s, r_t)) <= ratio * size
  r = decomp.lowered_svd_rank(shape, ratio=ratio)
  assert r == 1 or r * (s * d_h * d_w + t) <= ratio * size
  assert (r + 1) * (s * d_h * d_w + t) > ratio * size or r == min(t, s * d_h * d_w)
  c = decomp.cp_rank(shape, ratio=ratio)
  assert c * (sum(shape) + 1) <= ratio * size < (c + 1) * (sum(shape) + 1) or c == 1
  tt = decomp.tt_ranks(shape, ratio=ratio)
  full = (1, *tt, 1)
  assert all(r <= m for r, m in zip(tt, decomp.tt_max_ranks(shape), strict=True))
  storage = sum(full[k] * shape[k] * full[k + 1] for k in range(4))
  assert storage <= ratio * size or set(tt) == {1}


def test_tucker2_ranks_proportional_to_channels():
  assert decomp.tucker2_ranks((3, 3, 64, 128), ratio=0.25)[1] == pytest.approx(
    2 * decomp.tucker2_ranks((3, 3, 64, 128), ratio=0.25)[0], abs=1
  )


@pytest.mark.parametrize("eps", [0.1, 0.3])
def test_eps_rules(eps):
  rng = np.random.default_rng(0)
  k = ref.low_rank_tucker(rng, (3, 3, 32, 48), (3, 3, 10, 12)) + 0.05 * rng.standard_normal(
    (3, 3, 32, 48)
  )
  r_s, r_t = decomp.tucker2_ranks_eps(k, eps=eps)
  assert float(decomp.rel_error(np.asarray(k), decomp.tucker2(k, (r_s, r_t)))) <= eps
  # Minimal per mode under the split of eps.
  delta = eps / np.sqrt(2) * np.linalg.norm(k)
  for mode, r in ((2, r_s), (3, r_t)):
    tails = ref.tails(np.linalg.svd(ref.unfold(k, mode), compute_uv=False))
    assert tails[r] <= delta < tails[r - 1]
  r = decomp.lowered_svd_rank_eps(k, eps=eps)
  assert float(decomp.rel_error(np.asarray(k), decomp.lowered_svd(k, r))) <= eps
  assert (
    float(decomp.rel_error(np.asarray(k), decomp.lowered_svd(k, r - 1))) > eps if r > 1 else True
  )


@pytest.mark.parametrize("true_rank,shape", [(5, (40, 120)), (12, (64, 576)), (3, (30, 20))])
def test_vbmf_recovers_planted_rank(true_rank, shape):
  rng = np.random.default_rng(true_rank)
  signal = rng.standard_normal((shape[0], true_rank)) @ rng.standard_normal((true_rank, shape[1]))
  y = signal + 0.1 * rng.standard_normal(shape)
  assert decomp.vbmf_rank(y) == true_rank
  assert decomp.vbmf_rank(y.T) == true_rank


def test_vbmf_noise_estimate_matches_scipy():
  """Our golden-section minimiser finds scipy's bounded minimum of the free energy."""
  rng = np.random.default_rng(7)
  y = rng.standard_normal((30, 80)) @ np.diag(np.linspace(0.1, 1, 80)) + 0.0
  big_l, big_m = y.shape
  alpha = big_l / big_m
  tauubar = 2.5129 * np.sqrt(alpha)
  xubar = (1 + tauubar) * (1 + alpha / tauubar)
  s = np.linalg.svd(y, compute_uv=False)
  eh_ub = int(min(np.ceil(big_l / (1 + alpha)) - 1, big_l)) - 1
  upper = np.sum(s**2) / (big_l * big_m)
  lower = max(s[eh_ub + 1] ** 2 / (big_m * xubar), np.mean(s[eh_ub + 1 :] ** 2) / big_m)

  def f(v):
    return rr._evb_objective(v, big_l, big_m, s, 0.0, xubar)

  ours = rr._golden_min(f, lower, upper)
  theirs = scipy.optimize.minimize_scalar(
    f, bounds=[lower, upper], method="bounded", options={"xatol": 1e-12}
  ).x
  assert f(ours) <= f(theirs) + 1e-9
  assert ours == pytest.approx(theirs, rel=1e-4)


def test_tucker2_vbmf_on_planted_kernel():
  rng = np.random.default_rng(3)
  k = ref.low_rank_tucker(rng, (3, 3, 64, 64), (3, 3, 8, 16))
  k = k / np.linalg.norm(k) * 50 + 0.01 * rng.standard_normal(k.shape)
  assert decomp.tucker2_ranks_vbmf(k) == (8, 16)
