"""Plants plausible bugs one at a time and checks that the named tests catch each.

  PYTHONPATH=. python -m benchmarks.mutants               # every mutant
  PYTHONPATH=. python -m benchmarks.mutants --only seqkd  # names containing "seqkd"
  PYTHONPATH=. python -m benchmarks.mutants --list

Each mutant is one exact text replacement in one file. For each, the repository's tracked
files are copied to a temporary folder, the replacement is made there (a replacement whose
text is no longer in the file is reported `stale`, so the list cannot rot silently), and
the mutant's tests run in that copy (`pytest -x`). `caught`: a test failed; `survived`:
every test passed with the bug in. The exit status is 1 if any mutant survived or is stale.

Run it before closing an issue that touches the math or the training loop; it is not in
CI (minutes per mutant). A tool such as mutmut or cosmic-ray generates operator-level
mutants by the thousand and reruns the suite for each: this suite takes 15 minutes on two
cores, so we keep a short list of the bugs that matter (a wrong rank, a moved stride, a
lost mask), each with the tests that must catch it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import NamedTuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Mutant(NamedTuple):
  name: str
  file: str
  old: str
  new: str
  tests: tuple  # pytest arguments: files, `-k` expressions


MUTANTS = [
  # --- issue 40's table ------------------------------------------------------------------
  Mutant(
    "seqkd_mask_on_every_block",
    "train/steps.py",
    'on = len(path) > 1 and path[0] == "blocks" and path[1] == block',
    "on = True",
    ("tests/test_train.py", "-k", "seqkd"),
  ),
  Mutant(
    "trainer_drops_the_seqkd_mask",
    "train/trainer.py",
    "mask = steps_lib.block_mask(state.params, loss.block)",
    "mask = None",
    ("tests/test_train.py", "-k", "seqkd"),
  ),
  Mutant(
    "checkpoint_sha256_not_compared",
    "train/checkpoint.py",
    "or array_sha256(a) != digest:",
    ":",
    ("tests/test_reliability.py", "-k", "one_value_changed"),
  ),
  Mutant(
    "svd_dense_macs_doubled",
    "tnn/layers.py",
    'return ops.contract_macs("ns,sr,rt->nt", xs, (ws[0], r), (r, ws[1]))',
    'return 2 * ops.contract_macs("ns,sr,rt->nt", xs, (ws[0], r), (r, ws[1]))',
    ("tests/test_layers.py", "-k", "dense_macs"),
  ),
  Mutant(
    "recalibrate_bn_returns_the_model",
    "train/trainer.py",
    "  return nnx.merge(graphdef, params, avg)",
    "  return model",
    ("tests/test_train.py", "-k", "bn_"),
  ),
  Mutant(
    "run_skips_bn_recalibration",
    "train/run.py",
    "      student = self.recompute_bn(student, c)",
    "      pass",
    ("tests/test_train.py", "-k", "bn_batches"),
  ),
  Mutant(
    "tucker_stride_after_a_stride_1_conv",
    "tnn/functional.py",
    '  y = ops.conv(y, p["core"], strides=strides, padding=padding)\n'
    '  return ops.contract("nhwb,tb->nhwt", y, p["u_t"])',
    '  y = ops.conv(y, p["core"], strides=1, padding=padding)[:, :: strides[0], :: strides[1]]\n'
    '  return ops.contract("nhwb,tb->nhwt", y, p["u_t"])',
    ("tests/test_layers.py", "-k", "factorized_equals_reconstructed and Tucker"),
  ),
  # --- one per decomposition ------------------------------------------------------------
  Mutant(
    "hosvd_rank_off_by_one",
    "decomp/tucker.py",
    "factors = tuple(None if r is None else _leading(xs, k, r, method)",
    "factors = tuple(None if r is None else _leading(xs, k, max(r - 1, 1), method)",
    ("tests/test_tucker.py",),
  ),
  Mutant(
    "tt_svd_error_budget_not_split",
    "decomp/tt_tr.py",
    "  n = max(x.ndim - 1, 1)\n  return jnp.asarray(eps / math.sqrt(n)",
    "  n = 1\n  return jnp.asarray(eps / math.sqrt(n)",
    ("tests/test_tt_tr.py",),
  ),
  Mutant(
    "rsdtr_keeps_the_largest_storage",
    "decomp/rsdtr.py",
    "    return min(mine, key=lambda c: (self.storage(c), c[1], c[2]))",
    "    return max(mine, key=lambda c: (self.storage(c), c[1], c[2]))",
    ("tests/test_rsdtr.py",),
  ),
  Mutant(
    "cp_als_weights_not_normalised",
    "decomp/cp.py",
    "  norms = jnp.linalg.norm(a, axis=0)",
    "  norms = jnp.ones(a.shape[1], a.dtype)",
    ("tests/test_cp.py",),
  ),
  Mutant(
    "lowered_svd_keeps_one_rank_less",
    "decomp/lowrank.py",
    "  u, _, rest = truncated_svd(kernel.reshape(d_h * d_w * s, t), rank, method)",
    "  u, _, rest = truncated_svd(kernel.reshape(d_h * d_w * s, t), max(rank - 1, 1), method)",
    ("tests/test_lowrank.py",),
  ),
  Mutant(
    "gram_route_unsorted_eigenvectors",
    "decomp/_linalg.py",
    "  return lam[..., ::-1], v[..., ::-1]",
    "  return lam[..., ::-1], v",
    ("tests/test_linalg.py",),
  ),
  Mutant(
    "scale_not_restored",
    "decomp/factors.py",
    "  return f._replace(core=f.core * s)",
    "  return f",
    ("tests/test_properties.py", "-k", "any_scale"),
  ),
  Mutant(
    "batched_lapack_on_the_cpu",
    "decomp/_linalg.py",
    "    return functools.partial(one_matrix_at_a_time, core_ndims=core_ndims)\n",
    "    return functools.partial(one_matrix_at_a_time, core_ndims=core_ndims)\n  return fn\n",
    ("tests/test_linalg.py", "-k", "one_matrix"),
  ),
  # --- one per layer kind -----------------------------------------------------------------
  Mutant(
    "svd_conv_factors_transposed_order",
    "tnn/functional.py",
    '  return ops.contract("nhwr,rt->nhwt", y, p["v"])',
    '  return ops.contract("nhwr,rt->nhwt", y[..., ::-1], p["v"])',
    ("tests/test_layers.py", "-k", "factorized_equals_reconstructed and SVD"),
  ),
  Mutant(
    "cp_conv_drops_the_height_filter",
    "tnn/functional.py",
    '  y = ops.depthwise_1d(y, p["a_h"], axis=1, stride=strides[0], pad=ph)  # d_h x 1',
    "  y = y[:, :: strides[0]]  # d_h x 1",
    ("tests/test_layers.py", "-k", "factorized_equals_reconstructed and CPConv"),
  ),
  Mutant(
    "tr_conv_cores_swapped",
    "tnn/functional.py",
    '  y = _conv_h(y, jnp.transpose(p["g1"], (1, 0, 2)), strides, ph)  # (d_h, R1, R2)',
    '  y = _conv_h(y, jnp.transpose(p["g1"], (1, 0, 2))[::-1], strides, ph)  # (d_h, R1, R2)',
    ("tests/test_layers.py", "-k", "factorized_equals_reconstructed and TRConv"),
  ),
  Mutant(
    "mform_conv_with_stride_1",
    "tnn/functional.py",
    "    y = ops.conv(y, sp[..., None], strides=strides, padding=padding)  # (N T, H', W', 1)",
    "    y = ops.conv(y, sp[..., None], strides=1, padding=padding)  # (N T, H', W', 1)",
    ("tests/test_layers.py", "-k", "factorized_equals_reconstructed and (MCP or MTT)"),
  ),
  # --- one per training phase -------------------------------------------------------------
  Mutant(
    "deeptwist_gate_one_step_early",
    "train/steps.py",
    "  return step % sd == 0",
    "  return (step + 1) % sd == 0",
    ("tests/test_train.py", "-k", "distortion"),
  ),
  Mutant(
    "distillation_weights_swapped",
    "train/steps.py",
    "    return self.alpha * kd + (1 - self.alpha) * ce, logits",
    "    return (1 - self.alpha) * kd + self.alpha * ce, logits",
    ("tests/test_train.py", "-k", "distillation"),
  ),
  Mutant(
    "signal_not_saved_at_the_step_in_flight",
    "train/trainer.py",
    "          save(s)  # the steps before the signal are kept: a rerun resumes here",
    "          pass",
    ("tests/test_reliability.py", "-k", "signal and signals0"),
  ),
  Mutant(
    "resume_reads_the_wrong_batch",
    "train/trainer.py",
    "    idx = data_lib.batch_indices(n, batch_size, seed, s)",
    "    idx = data_lib.batch_indices(n, batch_size, seed, s - start)",
    ("tests/test_train.py", "-k", "killed_run_resumes"),
  ),
]


def _copy(dst: str) -> None:
  files = subprocess.run(
    ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
    cwd=ROOT,
    capture_output=True,
    text=True,
    check=True,
  ).stdout.split("\n")
  for f in filter(None, files):
    src = os.path.join(ROOT, f)
    if os.path.isfile(src):
      os.makedirs(os.path.dirname(os.path.join(dst, f)) or dst, exist_ok=True)
      shutil.copy2(src, os.path.join(dst, f))


def run_one(m: Mutant, timeout: int) -> tuple[str, float]:
  with tempfile.TemporaryDirectory(prefix=f"mutant-{m.name}-") as tmp:
    _copy(tmp)
    path = os.path.join(tmp, m.file)
    with open(path) as f:
      text = f.read()
    if text.count(m.old) != 1:
      return "stale", 0.0
    with open(path, "w") as f:
      f.write(text.replace(m.old, m.new))
    env = dict(os.environ, PYTHONPATH=tmp)
    t0 = time.time()
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *m.tests]
    try:
      proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
      return "caught (timeout)", time.time() - t0
    # pytest: 0 all passed, 1 a test failed, 5 no test selected, else an error of its own.
    verdict = {0: "survived", 1: "caught", 5: "no tests"}.get(proc.returncode, "error")
    return verdict, time.time() - t0


def main(argv=None) -> int:
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--only", default="", help="run the mutants whose name contains this")
  p.add_argument("--list", action="store_true")
  p.add_argument("--timeout", type=int, default=1200, help="seconds per mutant")
  a = p.parse_args(argv)
  chosen = [m for m in MUTANTS if a.only in m.name]
  if a.list:
    for m in chosen:
      print(f"{m.name:42s} {m.file:22s} {' '.join(m.tests)}")
    return 0
  bad = 0
  for m in chosen:
    verdict, secs = run_one(m, a.timeout)
    bad += not verdict.startswith("caught")
    print(f"{m.name:42s} {verdict:16s} {secs:6.0f} s  {' '.join(m.tests)}", flush=True)
  print(f"\n{len(chosen) - bad} of {len(chosen)} caught")
  return 1 if bad else 0


if __name__ == "__main__":
  sys.exit(main())
