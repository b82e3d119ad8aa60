"""Multi-host data parallelism, for real: two processes joined by `jax.distributed` (one
CPU device each, gloo collectives) train to the same parameters and evaluate to the same
accuracy as one process with two devices, each process reading only its half of every
batch."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import tnn
from tests.test_train import _config
from train import checkpoint, trainer
from train import steps as steps_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 12

SCRIPT = """
import sys, jax
jax.config.update("jax_numpy_dtype_promotion", "standard")
mode, workdir = sys.argv[1], sys.argv[2]
sys.path.insert(0, {repo!r})
from tests.test_train import _config
from train import data, run
if mode != "single":  # what `python -m train --jax_distributed` does, with explicit cluster
  run.initialize_distributed(
    coordinator_address=f"localhost:{{sys.argv[3]}}", num_processes=2, process_id=int(mode)
  )

rows_read, eval_rows = set(), set()
take = data.Split.take
def counting_take(self, idx, aug_seed=None):
  # training batches carry an augmentation seed, evaluation batches do not
  (rows_read if aug_seed is not None else eval_rows).add(len(idx))
  return take(self, idx, aug_seed)
data.Split.take = counting_take
c = _config(("dense",), steps={steps})
c.checkpoint_every = 4
c.eval_every = 0  # the rows read are those of the training batches and the final evaluation
run.run(c, workdir, data.synthetic())
print("ROWS_READ", jax.process_index(), sorted(rows_read), sorted(eval_rows))
"""


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _final_state(workdir):
  """The last checkpoint's leaves, restored (checked) replicated over this process's 2
  devices."""
  c = _config(("dense",), steps=STEPS)
  model = tnn.models.MODELS[c.model](4, rngs=nnx.Rngs(0), in_channels=1, **dict(c.model_kwargs))
  tx, _ = trainer.make_optimizer(dict(c.dense.opt), STEPS)
  _, state = steps_lib.init_state(model, tx, 0)
  rep = NamedSharding(jax.make_mesh((2,), ("data",)), P())
  state, step, _ = checkpoint.restore(os.path.join(workdir, "dense"), state, rep)
  return step, [np.asarray(x) for x in jax.tree.leaves(state)]


def test_two_processes_train_like_one_with_two_devices(tmp_path):
  script = tmp_path / "job.py"
  script.write_text(SCRIPT.format(repo=REPO, steps=STEPS))

  def env(devices):
    flags = f"--xla_force_host_platform_device_count={devices}"
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags)

  run = [sys.executable, str(script)]
  single = subprocess.Popen([*run, "single", str(tmp_path / "one")], env=env(2), **_pipes())
  port = str(_free_port())
  pair = [
    subprocess.Popen([*run, str(i), str(tmp_path / "two"), port], env=env(1), **_pipes())
    for i in range(2)
  ]
  outs = [p.communicate(timeout=300) for p in (single, *pair)]
  for p, (_, err) in zip((single, *pair), outs, strict=True):
    assert p.returncode == 0, err[-3000:]
  # Each process of the pair read its half of every 32-image training batch and of the
  # 256-image test set; one process with two devices read all of them.
  assert "ROWS_READ 0 [32] [256]" in outs[0][0]
  assert "ROWS_READ 0 [16] [128]" in outs[1][0] and "ROWS_READ 1 [16] [128]" in outs[2][0]
  acc = [json.loads((tmp_path / w / "results.json").read_text())[0] for w in ("one", "two")]
  assert acc[0]["test_accuracy"] == acc[1]["test_accuracy"] > 0.5
  s1, a = _final_state(str(tmp_path / "one"))
  s2, b = _final_state(str(tmp_path / "two"))
  assert s1 == s2 == STEPS
  for x, y in zip(a, b, strict=True):
    np.testing.assert_array_equal(x, y)  # bitwise: a two-term all-reduce sum is exact


def _pipes():
  return dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


FORWARD_SCRIPT = """
import sys, jax
jax.config.update("jax_numpy_dtype_promotion", "standard")
rank, port = int(sys.argv[1]), sys.argv[2]
sys.path.insert(0, {repo!r})
from train import run, data, trainer
import tnn
from tests.test_train import _config
run.initialize_distributed(
  coordinator_address=f"localhost:{{port}}", num_processes=2, process_id=rank
)
paths = ["a", "b"]
mine = {{"choice": {{"a": "reconstructed", "b": "factorized"}}}} if rank == 0 else None
theirs = None if rank == 0 else {{"choice": {{"a": "factorized", "b": "factorized"}}}}
print("FROM0", rank, run._from_process_0(mine, paths)["choice"], run._from_process_0(theirs, paths))
ds = data.synthetic()
c = _config(("dense",))
model = run.build_model(c, ds)
student = tnn.compress(model, tnn.make_plan(model, "tr", ratio=0.3))
t = trainer.step_seconds(
  student, ds, cfg=run.step_config(c, ds), opt=dict(c.dense.opt), steps=4, batch_size=32,
  seed=0, timed=2,
)
print("SECONDS", rank, repr(t))
"""


def test_two_processes_make_process_0_s_forward_choice(tmp_path):
  """`forward="auto"` under `jax.distributed`: every process takes process 0's stored
  choice (or none), and the step time each trial is judged by is process 0's, so that the
  processes keep running the same programs."""
  script = tmp_path / "job.py"
  script.write_text(FORWARD_SCRIPT.format(repo=REPO))
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  port = str(_free_port())
  procs = [
    subprocess.Popen([sys.executable, str(script), str(i), port], env=env, **_pipes())
    for i in range(2)
  ]
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, outs, strict=True):
    assert p.returncode == 0, err[-3000:]
  want = "{'a': 'reconstructed', 'b': 'factorized'} None"
  for i, (out, _) in enumerate(outs):
    assert f"FROM0 {i} {want}" in out
  secs = [next(x.split()[2] for x in o.splitlines() if x.startswith("SECONDS")) for o, _ in outs]
  assert secs[0] == secs[1] and 0 < float(secs[0]) < 60  # process 0's figure on both
