"""Nothing silent: every probe is a real CLI process on a real workdir, with real damage.

Corrupt checkpoints fall back to the newest good one (and resume to the same bits),
a workdir refuses a config it was not run with, a non-finite state is never saved, one
run at a time holds a workdir, and the metrics log survives deletion and junk.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import ml_collections
import numpy as np
import pytest

from train import checkpoint
from train.trainer import ConfigMismatch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIG = """
import sys
sys.path.insert(0, {repo!r})
from tests.test_train import _config


def get_config(arg=None):
  c = _config(("dense",), steps={steps})
  c.checkpoint_every, c.log_every = {every}, {log}
  c.init_from, c.resume, c.data_dir = "", "", ""
  return c
"""


def _cli(tmp_path, workdir, *overrides, steps=30, every=10, log=5, wait=True):
  cfg = tmp_path / f"cfg_{steps}_{every}_{log}.py"
  cfg.write_text(CONFIG.format(repo=REPO, steps=steps, every=every, log=log))
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", PYTHONPATH=REPO)
  cmd = [sys.executable, "-m", "train", "--config", str(cfg), "--workdir", str(workdir)]
  cmd += list(overrides)
  if not wait:
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def _params(workdir):
  step, arrays = checkpoint.latest_arrays(os.path.join(workdir, "dense"))
  return step, arrays


def _one_clear_line(proc, *needles):
  assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
  errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
  assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  for n in needles:
    assert n in errors[0], errors[0]
  return errors[0]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """One uninterrupted 30-step run (checkpoints at 20 and 30 kept)."""
  root = tmp_path_factory.mktemp("reliability")
  proc = _cli(root, root / "full")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert checkpoint.steps_on_disk(str(root / "full" / "dense")) == [30, 20]
  return root


def _flip_bytes(step_dir):
  p = step_dir / "arrays.npz"
  b = bytearray(p.read_bytes())
  mid = len(b) // 2
  b[mid : mid + 64] = bytes(x ^ 0xFF for x in b[mid : mid + 64])
  p.write_bytes(bytes(b))


def _truncate(step_dir):
  p = step_dir / "arrays.npz"
  p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _junk_meta(step_dir):
  (step_dir / "meta.json").write_bytes(os.urandom(200))


def _zero_files(step_dir):
  for f in step_dir.iterdir():
    f.write_bytes(b"")


def _empty_folder(step_dir):
  for f in step_dir.iterdir():
    f.unlink()


def _one_value_changed(step_dir):
  """A valid `arrays.npz` (its zip CRCs right) whose one value differs from the saved one:
  only the SHA-256 in meta.json can tell."""
  p = step_dir / "arrays.npz"
  with np.load(p) as z:
    arrays = {k: z[k] for k in z.files}
  name = next(k for k, a in arrays.items() if k.startswith("params/") and a.dtype.kind == "f")
  arrays[name] = arrays[name].copy()
  arrays[name].flat[0] += 1
  with open(p, "wb") as f:
    np.savez(f, **arrays)
  return name


@pytest.mark.parametrize(
  "damage", [_flip_bytes, _truncate, _junk_meta, _zero_files, _empty_folder, _one_value_changed]
)
def test_a_corrupt_latest_checkpoint_is_skipped_and_the_run_ends_the_same(finished, damage):
  work = finished / f"damaged_{damage.__name__}"
  shutil.copytree(finished / "full", work)
  changed = damage(work / "dense" / "ckpt" / "30")
  proc = _cli(finished, work)
  assert proc.returncode == 0, proc.stderr[-3000:]
  skipped = [ln for ln in proc.stderr.splitlines() if "skipped" in ln]
  assert len(skipped) == 1 and "ckpt/30 skipped" in skipped[0], proc.stderr[-2000:]
  if changed:  # the checksum, naming the array, is what refused it
    assert f"array {changed!r} does not match its checksum" in skipped[0], skipped[0]
  s1, a = _params(finished / "full")
  s2, b = _params(work)
  assert s1 == s2 == 30 and a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)  # retrained 20 -> 30, bitwise


def test_no_good_checkpoint_is_one_message_and_exit_2(finished):
  work = finished / "all_bad"
  shutil.copytree(finished / "full", work)
  _flip_bytes(work / "dense" / "ckpt" / "30")
  _junk_meta(work / "dense" / "ckpt" / "20")
  proc = _cli(finished, work)
  _one_clear_line(proc, "no usable checkpoint", str(work / "dense"), "Delete that phase folder")


def test_a_changed_config_is_refused_before_compute_and_the_record_kept(finished):
  work = finished / "changed"
  shutil.copytree(finished / "full", work)
  before = (work / "config.json").read_text()
  proc = _cli(finished, work, "--config.batch_size=16")
  _one_clear_line(proc, "batch_size: 32 -> 16", "--config.resume=force")
  assert (work / "config.json").read_text() == before
  proc = _cli(finished, work, "--config.dense.steps=20")
  _one_clear_line(proc, "dense.steps: 30 -> 20")
  proc = _cli(finished, work, "--config.seed=3")
  _one_clear_line(proc, "seed: 0 -> 3")
  # Settings that change neither a state nor a result pass, and are recorded.
  proc = _cli(finished, work, log=7)
  assert proc.returncode == 0, proc.stderr[-2000:]
  change = json.loads((work / "config_changes.jsonl").read_text().splitlines()[-1])
  assert change["forced"] is False and any("log_every" in c for c in change["changes"])
  # An explicit override is recorded as such.
  proc = _cli(finished, work, "--config.batch_size=16", "--config.resume=force")
  assert proc.returncode == 0, proc.stderr[-2000:]
  change = json.loads((work / "config_changes.jsonl").read_text().splitlines()[-1])
  assert change["forced"] is True and any("batch_size" in c for c in change["changes"])
  assert json.loads((work / "config.json").read_text())["batch_size"] == 16


def test_a_phase_trained_from_another_dense_net_is_refused(finished):
  """The record gone, the dense folder deleted and retrained at another seed: the finetune
  phase was trained from the old dense net, and its fingerprint (which names its parent)
  refuses it rather than reporting it as the new net's."""
  work = finished / "parent"
  methods = "--config.methods=dense,finetune"
  proc = _cli(finished, work, methods, "--config.finetune.steps=4", steps=10, every=5)
  assert proc.returncode == 0, proc.stderr[-2000:]
  shutil.rmtree(work / "dense")
  (work / "config.json").unlink()
  proc = _cli(
    finished, work, methods, "--config.finetune.steps=4", "--config.seed=3", steps=10, every=5
  )
  _one_clear_line(proc, "phase 'finetune'", "parent")


def test_a_non_finite_state_is_never_saved_and_a_rerun_is_not_stuck(finished):
  work = finished / "nan"
  # checkpoint_every (4) is not a multiple of log_every (7): the check must run at saves.
  proc = _cli(finished, work, "--config.dense.opt.lr=1e30", every=4, log=7)
  _one_clear_line(proc, "not finite")
  for step in checkpoint.steps_on_disk(str(work / "dense")):
    with np.load(work / "dense" / "ckpt" / str(step) / "arrays.npz") as z:
      assert all(np.all(np.isfinite(z[k])) for k in z.files if z[k].dtype.kind == "f"), step
  # A sane rerun (forced past the changed learning rate) finishes.
  proc = _cli(finished, work, "--config.resume=force", every=4, log=7)
  assert proc.returncode == 0, proc.stderr[-2000:]
  step, arrays = _params(work)
  assert step == 30 and all(np.all(np.isfinite(a)) for a in arrays.values() if a.dtype.kind == "f")


def test_one_writer_per_workdir_and_a_killed_holder_leaves_no_stale_lock(finished):
  work = finished / "locked"
  first = _cli(finished, work, steps=2000, every=1000, log=5, wait=False)
  metrics = work / "metrics.jsonl"
  deadline = time.time() + 240
  while time.time() < deadline and not (metrics.exists() and metrics.read_text().strip()):
    time.sleep(0.1)
  try:
    second = _cli(finished, work, steps=2000, every=1000, log=5)
    _one_clear_line(second, "in use by another run", f'"pid": {first.pid}')
  finally:
    first.send_signal(signal.SIGKILL)
    first.communicate()
  third = _cli(finished, work, steps=2000, every=1000, log=5, wait=False)
  try:
    deadline, n0 = time.time() + 240, len(metrics.read_text().splitlines())
    while time.time() < deadline and len(metrics.read_text().splitlines()) <= n0:
      assert third.poll() is None, third.communicate()[1][-2000:]
      time.sleep(0.1)
    assert len(metrics.read_text().splitlines()) > n0  # it took the lock and trains
  finally:
    third.send_signal(signal.SIGKILL)
    third.communicate()


def test_a_deleted_metrics_log_is_reopened_and_junk_lines_are_skipped(finished):
  work = finished / "metrics"
  proc = _cli(finished, work, steps=400, every=400, log=5, wait=False)
  metrics = work / "metrics.jsonl"
  deadline = time.time() + 240
  while time.time() < deadline and not (
    metrics.exists() and len(metrics.read_text().splitlines()) >= 2
  ):
    time.sleep(0.05)
  metrics.unlink()
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-2000:]
  assert "was gone; reopened" in err
  rows = [json.loads(x) for x in metrics.read_text().splitlines()]
  assert rows[-1].get("event") == "result" and any(r.get("step") == 400 for r in rows)
  with open(metrics, "a") as f:
    f.write("{not json\n")
  proc = _cli(finished, work, steps=400, every=400, log=5)  # finished: re-evaluates, plots
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "1 unreadable line(s) skipped" in proc.stdout
  assert (work / "accuracy_vs_step.png").exists()


def test_foreseeable_cli_errors_are_one_line_and_exit_2(finished, tmp_path):
  work = tmp_path / "w"
  proc = _cli(finished, work, "--config.methd=x")
  _one_clear_line(proc, "unknown config key 'methd'", 'Did you mean "methods"')
  proc = _cli(finished, work, "--config.dense.stepz=1")  # a section's key: its full name
  _one_clear_line(proc, "unknown config key 'dense.stepz'", "--show")
  proc = _cli(finished, work, "--config.batch_size=abc")
  _one_clear_line(proc, "batch_size")
  proc = _cli(finished, work, "--config.dataset=fashion_mnist", f"--config.data_dir={tmp_path}")
  _one_clear_line(proc, "are not in", "dataset-fashion-mnist")
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", PYTHONPATH=REPO)
  missing = subprocess.run(
    [sys.executable, "-m", "train", "--config", str(tmp_path / "nope.py"), "--workdir", str(work)],
    env=env, capture_output=True, text=True, timeout=120,
  )  # fmt: skip
  _one_clear_line(missing, "nope.py")
  helped = subprocess.run(
    [sys.executable, "-m", "train", "--help"], env=env, capture_output=True, text=True, timeout=120
  )
  assert helped.returncode == 0 and "train/configs/demo.py" in helped.stdout


def test_init_from_is_compared_by_content_not_path(tmp_path):
  """The same teacher file under another path (a moved checkout) resumes; another file
  under the recorded path is refused, naming the key."""
  from train import workdir as workdir_lib

  work = tmp_path / "w"
  (work / "dense" / "ckpt").mkdir(parents=True)  # a phase on disk: changes now matter
  a, b = tmp_path / "a.npz", tmp_path / "b.npz"
  a.write_bytes(b"teacher one")
  b.write_bytes(b"teacher one")
  cfg = ml_collections.ConfigDict(dict(methods=("dense",), dense=dict(steps=1), init_from=str(a)))
  workdir_lib.check_config(str(work), cfg)
  assert json.loads((work / "config.json").read_text())["init_from_sha256"]
  cfg.init_from = str(b)  # moved: same bytes
  workdir_lib.check_config(str(work), cfg)
  assert json.loads((work / "config.json").read_text())["init_from"] == str(b)
  b.write_bytes(b"another teacher")
  with pytest.raises(ConfigMismatch, match="init_from_sha256"):
    workdir_lib.check_config(str(work), cfg)


def test_a_sections_forward_path_may_change_on_resume_and_its_settings_may_not(tmp_path):
  """`forward` (the same function through another path) is no setting that shapes a
  phase: a started section may change it, and it is left out of the phase fingerprint;
  the section's other settings stay refused."""
  from train import workdir as workdir_lib

  work = tmp_path / "w"
  (work / "seqkd_block0" / "ckpt").mkdir(parents=True)  # the section has started
  sec = dict(kind="seqkd", method="mcp", ratio=0.1, opt=dict(lr=1e-3))
  cfg = ml_collections.ConfigDict(dict(methods=("dense", "seqkd"), seqkd=sec))
  workdir_lib.check_config(str(work), cfg)
  cfg.seqkd.forward = "reconstructed"
  workdir_lib.check_config(str(work), cfg)
  assert json.loads((work / "config.json").read_text())["seqkd"]["forward"] == "reconstructed"
  assert workdir_lib.shaping(cfg.seqkd.to_dict()) == sec
  cfg.seqkd.opt.lr = 1e-2
  with pytest.raises(ConfigMismatch, match=r"seqkd.opt.lr: 0.001 -> 0.01"):
    workdir_lib.check_config(str(work), cfg)


def _wait_for_step(metrics, at_least, proc, timeout=240):
  deadline = time.time() + timeout
  while time.time() < deadline:
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    if metrics.exists():
      steps = [json.loads(x).get("step", 0) for x in metrics.read_text().splitlines() if x]
      if steps and max(steps) >= at_least:
        return max(steps)
    time.sleep(0.02)
  raise AssertionError(f"no step {at_least} logged in {timeout} s")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  """One uninterrupted 200-step run (checkpoints every 100), the reference of preemption."""
  root = tmp_path_factory.mktemp("preemption")
  proc = _cli(root, root / "full", steps=200, every=100, log=5)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return root


@pytest.mark.parametrize(
  "signals, code", [((signal.SIGTERM,), 143), ((signal.SIGINT,), 130), ((signal.SIGTERM,) * 3, 143)]
)
def test_a_signal_saves_the_step_in_flight_and_the_rerun_ends_bitwise_equal(
  uninterrupted, signals, code
):
  """SIGTERM (SIGINT) mid-phase: the step in flight finishes, a checkpoint is written at that
  step (not the last periodic one: nothing is lost), one line is printed, exit 143 (130). A
  second and third signal during the save change nothing. The rerun ends bitwise equal to
  the uninterrupted run."""
  root = uninterrupted
  work = root / f"signal-{signals[0]}-{len(signals)}"
  proc = _cli(root, work, steps=200, every=100, log=5, wait=False)
  seen = _wait_for_step(work / "metrics.jsonl", 120, proc)
  for s in signals:
    proc.send_signal(s)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == code, err[-2000:]
  lines = [ln for ln in err.splitlines() if ln.startswith("preempted")]
  assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
  at = int(lines[0].split()[3])
  assert lines[0] == (f"preempted at step {at} of phase dense; rerun the same command to resume")
  ckpt = work / "dense" / "ckpt"
  assert checkpoint.steps_on_disk(str(work / "dense"))[0] == at and seen <= at < 200
  assert not [p for p in os.listdir(ckpt) if p.startswith(".tmp")]
  proc = _cli(root, work, steps=200, every=100, log=5)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert f"from step {at}" in proc.stdout
  step, got = _params(work)
  _, want = _params(root / "full")
  assert step == 200 and got.keys() == want.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)


_ENOSPC = """
import errno, sys
import numpy as np
import train.trainer
from train.__main__ import entry

calls = {{"n": 0}}
real_savez = np.savez

def savez(f, **arrays):  # the disk fills up during the second checkpoint
  calls["n"] += 1
  if calls["n"] == 2 and {where!r} == "checkpoint":
    f.write(b"PK" * 1000)
    raise OSError(errno.ENOSPC, "No space left on device", f.name)
  return real_savez(f, **arrays)

np.savez = savez
real_log = train.trainer.Logger.log

def log(self, row):
  if {where!r} == "metrics" and row.get("step") == 15:
    raise OSError(errno.ENOSPC, "No space left on device", self.path)
  return real_log(self, row)

train.trainer.Logger.log = log
entry(sys.argv)
"""


@pytest.mark.parametrize("where", ["checkpoint", "metrics"])
def test_a_full_disk_is_one_line_exit_2_and_the_last_good_checkpoint_stays(finished, where):
  """ENOSPC injected into the checkpoint writer (the second save) or the metrics log: one
  `error:` line naming the path and the cause, exit 2, no temporary folder left, the
  previous checkpoint the newest and good, and a rerun with space again finishes."""
  work = finished / f"full-disk-{where}"
  cfg = finished / "cfg_30_10_5.py"
  cfg.write_text(CONFIG.format(repo=REPO, steps=30, every=10, log=5))
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", PYTHONPATH=REPO)
  cmd = [sys.executable, "-c", _ENOSPC.format(where=where), "train", "--config", str(cfg)]
  proc = subprocess.run(
    cmd + ["--workdir", str(work)], env=env, capture_output=True, text=True, timeout=300
  )
  line = _one_clear_line(proc, "No space left on device", "errno 28")
  if where == "checkpoint":
    assert str(work / "dense" / "ckpt") in line
    assert checkpoint.steps_on_disk(str(work / "dense")) == [10]
  else:
    assert str(work / "metrics.jsonl") in line
    assert checkpoint.steps_on_disk(str(work / "dense")) == [10]
  assert not [p for p in os.listdir(work / "dense" / "ckpt") if p.startswith(".tmp")]
  proc = _cli(finished, work)  # space again: resumes from step 10 and ends as the full run
  assert proc.returncode == 0, proc.stderr[-2000:]
  _, got = _params(work)
  _, want = _params(finished / "full")
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
