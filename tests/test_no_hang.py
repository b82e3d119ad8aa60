"""No library call hangs on the CPU, with no opt-in (jaxlib 0.10.2's batched LAPACK kernels
re-enter XLA's thread pool and can wait forever: `benchmarks/repro_cpu_hang.py`).

Each workload runs 50 times in a fresh process that sets nothing (no `XLA_FLAGS`, no
helper called first), as a library user's script would. A watchdog reads one line per run
and kills the process, failing the test, when a run takes more than 10x the expected time:
the first run (compile) is allowed `FIRST_S`; every later one 10x the median of the runs
before it, never less than `FLOOR_S`.
"""

import os
import selectors
import statistics
import subprocess
import sys

import pytest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = 50
FIRST_S = 300.0  # compile and first run, on a loaded 2-core CI machine
FLOOR_S = 2.0

_SCRIPT = r"""
import hashlib, sys, time
import jax, jax.numpy as jnp, numpy as np
import decomp, tnn
from flax import nnx

which, runs = sys.argv[1], int(sys.argv[2])
rng = np.random.default_rng(0)
k = jnp.asarray(rng.standard_normal((3, 3, 32, 48)), jnp.float32)
stack = jnp.asarray(rng.standard_normal((4, 3, 3, 16, 16)), jnp.float32)
kernels = [np.asarray(k), np.asarray(stack[0]), np.asarray(stack[1][:, :, :, :8])]

def decompositions():
  fs = [
    decomp.tucker2(k, (8, 12)), decomp.hosvd(k, (None, None, 8, 12)),
    decomp.hooi(k, (None, None, 8, 12), n_iter=2)[0], decomp.tucker2_sweep(k, (8, 12)),
    decomp.cp_als(k, 8, n_iter=5)[0], decomp.tt_svd(k, eps=0.3), decomp.tr_svd(k, eps=0.3),
    decomp.lowered_svd(k, 8), decomp.tiled_svd(k.reshape(-1, 48), grid=(2, 2), rank=4),
    decomp.rsdtr(k, eps=0.3), *decomp.rsdtr_stack(stack, eps=0.3),
    *decomp.rsdtr_many(kernels, eps=0.3),
  ]
  stacked = jax.vmap(lambda x: decomp.reconstruct(decomp.tucker2(x, (4, 4))))(stack)
  return [decomp.reconstruct(f) for f in fs] + [stacked]

if which == "decompositions":
  run = decompositions
elif which == "resnet50":
  from benchmarks import shapes
  from benchmarks.decomp import _kernels, make_distortion
  run = make_distortion(_kernels(shapes.resnet50()), "gram", "tucker2")[0]
else:
  model = tnn.models.resnet20(rngs=nnx.Rngs(0))
  run = lambda: tnn.make_plan(model, which, eps=1e-5).to_json()
def digest(out):  # the same inputs must give the same result in every run
  if isinstance(out, str):
    return hashlib.sha256(out.encode()).hexdigest()[:16]
  return hashlib.sha256(b"".join(np.asarray(x).tobytes() for x in out)).hexdigest()[:16]
for i in range(runs):
  t = time.perf_counter()
  out = run()
  print(f"run {i} {time.perf_counter() - t:.4f} {digest(out)}", flush=True)
"""


def _run_watched(which: str) -> tuple[list[float], set[str]]:
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "GLIBC_TUNABLES")}
  env.update(PYTHONPATH=_ROOT, JAX_PLATFORMS="cpu")
  proc = subprocess.Popen(
    [sys.executable, "-c", _SCRIPT, which, str(RUNS)],
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  sel = selectors.DefaultSelector()
  sel.register(proc.stdout, selectors.EVENT_READ)
  times: list[float] = []
  digests: set[str] = set()
  try:
    while len(times) < RUNS:
      allowed = FIRST_S if not times else max(FLOOR_S, 10 * statistics.median(times))
      if not sel.select(timeout=allowed):
        pytest.fail(
          f"{which}: run {len(times)} took over {allowed:.1f} s (10x the expected time); "
          f"runs so far {times}"
        )
      line = proc.stdout.readline()
      if not line:
        break
      _, _, seconds, digest = line.split()
      times.append(float(seconds))
      digests.add(digest)
  finally:
    proc.kill()
    _, err = proc.communicate()
  assert len(times) == RUNS, f"{which}: the process ended after {len(times)} runs:\n{err[-3000:]}"
  return times, digests


@pytest.mark.parametrize("which", ["decompositions", "resnet50", "svd", "tucker2", "tt", "tr"])
def test_fifty_runs_in_a_fresh_process_never_hang_and_agree(which):
  _, digests = _run_watched(which)
  assert len(digests) == 1, f"{which}: the runs gave {len(digests)} different results"
