"""`forward="auto"` in a run: each phase's factorized-layer paths chosen in its own train
step (`train.run.Context.choose_forward`), kept in the workdir for resumes, and the same
training (to rounding) as the factorized path."""

import json
import os

import jax
import ml_collections
import numpy as np
import pytest

from tests.test_train import _config
from train import checkpoint, trainer
from train import data as data_lib
from train import run as run_lib

FAST_IN = 4  # the fake measure: a rebuilt kernel with 4 input channels is faster


@pytest.fixture(autouse=True)
def _standard_promotion():
  with jax.numpy_dtype_promotion("standard"):
    yield


def _fake_step_seconds(calls):
  """A step time with a known answer: 1 s, less 0.3 s per layer of 4 input channels that
  runs through its rebuilt kernel, plus 0.3 s per other layer that does."""

  def fake(model, dataset, **kw):
    calls.append(kw["loss"].block)
    t = 1.0
    for m in _factorized(model).values():
      if m.forward == "reconstructed":
        t += -0.3 if m.weight_shape[2] == FAST_IN else 0.3
    return t

  return fake


def _factorized(model):
  import tnn

  layers = tnn.plan.layer_paths(model).items()
  return {p: m for p, m in layers if isinstance(m, tnn.layers.Factorized)}


def _config_auto(forward="auto"):
  c = _config(("dense", "finetune"), steps=10)
  c.finetune = ml_collections.ConfigDict(
    dict(method="tr", ratio=0.3, steps=10, opt=c.dense.opt, forward=forward, choose_steps=2)
  )
  return c


def _record_forwards(monkeypatch):
  """`{phase: {path: forward}}` of the model each `run_phase` call trains."""
  seen = {}
  real = trainer.run_phase

  def wrapped(name, workdir, model, *a, **kw):
    seen[name] = {p: m.forward for p, m in _factorized(model).items()}
    return real(name, workdir, model, *a, **kw)

  monkeypatch.setattr(trainer, "run_phase", wrapped)
  return seen


def test_auto_chooses_in_the_phase_step_and_keeps_the_choice(tmp_path, monkeypatch):
  ds = data_lib.synthetic()
  calls = []
  monkeypatch.setattr(trainer, "step_seconds", _fake_step_seconds(calls))
  seen = _record_forwards(monkeypatch)
  run_lib.run(_config_auto(), str(tmp_path / "a"), ds)
  stored = json.loads((tmp_path / "a" / "finetune" / "forward.json").read_text())
  # TR on the CNN (widths 4, 8, 8): the layers with 4 input channels are the first conv of
  # blocks 0 and 1; each is a group of its own (its own weight shape).
  want = {p: "factorized" for p in seen["finetune"]}
  want |= {"blocks.0.layers.0.conv": "reconstructed", "blocks.1.layers.0.conv": "reconstructed"}
  assert stored["choice"] == want
  assert seen["finetune"] == want  # the phase trained with it
  assert "dense" not in stored["choice"] and seen["dense"] == {}
  # The baseline, then one trial per group of alike layers: the last stage's two 8 -> 8
  # convs take one input shape, block 1's second conv another.
  assert calls == [None] * (1 + 4)
  # A phase that starts with a stored choice uses it and measures nothing (a resume).
  calls.clear()
  os.makedirs(tmp_path / "b" / "finetune")
  (tmp_path / "b" / "finetune" / "forward.json").write_text(json.dumps(stored))
  seen.clear()
  run_lib.run(_config_auto(), str(tmp_path / "b"), ds)
  assert calls == [] and seen["finetune"] == want
  # A finished workdir run again measures nothing either.
  (tmp_path / "a" / "finetune" / "forward.json").unlink()
  run_lib.run(_config_auto(), str(tmp_path / "a"), ds)
  assert calls == []


@pytest.mark.parametrize(
  "text",
  [
    "{not json",
    json.dumps({"choice": {"blocks.0.layers.0.conv": "reconstructed"}}),  # paths missing
    json.dumps({"other": 1}),
  ],
)
def test_a_bad_stored_choice_is_refused(tmp_path, text):
  os.makedirs(tmp_path / "finetune")
  bad = tmp_path / "finetune" / "forward.json"
  bad.write_text(text)
  with pytest.raises(ValueError, match="forward.json: not a forward choice"):
    run_lib.run(_config_auto(), str(tmp_path), data_lib.synthetic())


def test_auto_trains_the_same_function_as_the_factorized_path(tmp_path):
  """Measured for real (the choice is whatever this machine gives); the trained factors
  equal the factorized path's to float32 rounding."""
  ds = data_lib.synthetic()
  rows = {}
  for fw in ("factorized", "auto", "reconstructed"):
    # As the CLI runs: float32 throughout. With the suite's x64 on, parts of the steps
    # promote to float64 differently on the two paths, and 10 steps amplify that beyond
    # the tolerance below wherever this machine's measurement picks "reconstructed".
    with jax.enable_x64(False):
      rows[fw] = run_lib.run(_config_auto(fw), str(tmp_path / fw), ds)
    if fw == "auto":
      choice = json.loads((tmp_path / fw / "finetune" / "forward.json").read_text())["choice"]
      assert set(choice.values()) <= {"factorized", "reconstructed"} and len(choice) == 5
  ref = checkpoint.latest_arrays(str(tmp_path / "factorized" / "finetune"))[1]
  for fw in ("auto", "reconstructed"):
    got = checkpoint.latest_arrays(str(tmp_path / fw / "finetune"))[1]
    assert sorted(got) == sorted(ref)
    for k in ref:
      np.testing.assert_allclose(got[k], ref[k], rtol=1e-3, atol=1e-4, err_msg=k)
  assert rows["auto"][1]["test_accuracy"] == pytest.approx(
    rows["factorized"][1]["test_accuracy"], abs=0.02
  )


def test_step_seconds_times_the_phase_step_and_changes_nothing():
  import tnn
  from train import steps as steps_lib

  ds = data_lib.synthetic()
  c = _config_auto()
  model = run_lib.build_model(c, ds)
  student = tnn.compress(model, tnn.make_plan(model, "tr", ratio=0.3))
  before = [np.asarray(x) for x in jax.tree.leaves(steps_lib.split_model(student)[1:])]
  t = trainer.step_seconds(
    student,
    ds,
    cfg=run_lib.step_config(c, ds),
    opt=dict(c.dense.opt),
    steps=10,
    batch_size=32,
    seed=0,
    loss=steps_lib.BlockMSE(1),
    teacher=model,
    timed=2,
  )
  assert 0 < t < 60
  after = [np.asarray(x) for x in jax.tree.leaves(steps_lib.split_model(student)[1:])]
  for a, b in zip(before, after, strict=True):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match="timed must be a positive int"):
    trainer.step_seconds(student, ds, cfg=None, opt={}, steps=1, batch_size=32, seed=0, timed=0)
