"""train/: data validation, steps, DeepTwist, distillation, checkpoints, configs, CLI."""

import gzip
import json
import os
import signal
import struct
import subprocess
import sys
import time

import jax
import jax.extend
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

import tnn
from train import checkpoint as ckpt_lib
from train import data as data_lib
from train import run as run_lib
from train import steps as steps_lib
from train import trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _standard_promotion():
  """Flax's BatchNorm promotes with float32 internally (refused by strict promotion)."""
  with jax.numpy_dtype_promotion("standard"):
    yield


# --- data ---------------------------------------------------------------------------------


def _write_idx(path, array, magic_type=0x08):
  header = struct.pack(">HBB", 0, magic_type, array.ndim) + struct.pack(
    f">{array.ndim}I", *array.shape
  )
  with gzip.open(path, "wb") as f:
    f.write(header + array.astype(np.uint8).tobytes())


def _fake_fashion(tmp_path, n_train=60000, n_test=10000, label_max=9):
  rng = np.random.default_rng(0)
  for split, n in (("train", n_train), ("t10k", n_test)):
    _write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 255, (n, 28, 28)))
    _write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, label_max + 1, (n,)))
  return str(tmp_path)


def test_idx_reader_roundtrip(tmp_path):
  a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
  _write_idx(tmp_path / "a.gz", a)
  np.testing.assert_array_equal(data_lib.read_idx(str(tmp_path / "a.gz"), ndim=3), a)


def test_fashion_mnist_from_a_folder(tmp_path):
  ds = data_lib.load("fashion_mnist", _fake_fashion(tmp_path))
  assert ds.train.images.shape == (60000, 28, 28, 1) and ds.test.labels.shape == (10000,)


@pytest.mark.parametrize(
  "corrupt,match",
  [
    (lambda p: _write_idx(p, np.zeros((10000, 28, 28)), magic_type=0x09), "bad IDX magic"),
    (lambda p: p.write_bytes(b"\x1f\x8b\x08garbage"), "not a complete gzip"),
    (lambda p: _truncate_gz(p), "not a complete gzip|header says"),
    (lambda p: _write_idx(p, np.zeros((9999, 28, 28))), "10000"),
  ],
)
def test_corrupt_idx_files_are_detected(tmp_path, corrupt, match):
  d = _fake_fashion(tmp_path, n_train=60000)
  corrupt(tmp_path / "t10k-images-idx3-ubyte.gz")
  with pytest.raises(ValueError, match=match):
    data_lib.load("fashion_mnist", d)


def _truncate_gz(p):
  raw = p.read_bytes()
  p.write_bytes(raw[: len(raw) // 2])


def test_labels_out_of_range(tmp_path):
  d = _fake_fashion(tmp_path, label_max=10)
  with pytest.raises(ValueError, match=r"label 10 outside \[0, 9\]"):
    data_lib.load("fashion_mnist", d)


def test_missing_data_says_how_to_get_it(tmp_path):
  with pytest.raises(ValueError, match="apt-get install -y dataset-fashion-mnist"):
    data_lib.load("fashion_mnist", str(tmp_path))


def test_cifar_binary_and_truncation(tmp_path):
  rng = np.random.default_rng(0)
  for name, n in [(f"data_batch_{i}.bin", 10000) for i in range(1, 6)] + [
    ("test_batch.bin", 10000)
  ]:
    rec = np.concatenate([rng.integers(0, 10, (n, 1)), rng.integers(0, 255, (n, 3072))], 1)
    (tmp_path / name).write_bytes(rec.astype(np.uint8).tobytes())
  ds = data_lib.load("cifar10", str(tmp_path))
  assert ds.train.images.shape == (50000, 32, 32, 3)
  raw = (tmp_path / "test_batch.bin").read_bytes()
  (tmp_path / "test_batch.bin").write_bytes(raw[:-5])
  with pytest.raises(ValueError, match="whole number of 3073-byte records"):
    data_lib.load("cifar10", str(tmp_path))


def test_batch_order_is_a_function_of_seed_and_step():
  a = data_lib.batch_indices(100, 10, seed=3, step=12)
  np.testing.assert_array_equal(a, data_lib.batch_indices(100, 10, seed=3, step=12))
  epoch = np.concatenate([data_lib.batch_indices(100, 10, 3, s) for s in range(10, 20)])
  np.testing.assert_array_equal(np.sort(epoch), np.arange(100))  # epoch 1 is a permutation


def test_augment_is_a_crop_and_flip():
  x = jnp.arange(2 * 4 * 4, dtype=jnp.float32).reshape(2, 4, 4, 1)
  y = data_lib.augment(jax.random.key(0), x, crop_pad=0, flip=True)
  for i in range(2):
    assert np.array_equal(y[i], x[i]) or np.array_equal(y[i], x[i, :, ::-1])


# --- steps -------------------------------------------------------------------------------


def _config(tmp_methods=("dense",), steps=40):
  c = ml_collections.ConfigDict()
  c.dataset, c.data_dir, c.model = "synthetic", None, "cnn"
  c.model_kwargs = ml_collections.ConfigDict(dict(widths=(4, 8, 8)))
  c.pad_to = None
  c.augment = ml_collections.ConfigDict(dict(crop_pad=0, flip=False))
  c.label_smoothing, c.compute_dtype = 0.0, "float32"
  c.batch_size, c.seed = 32, 0
  c.checkpoint_every, c.keep, c.log_every = 10, 2, 5
  c.eval_every, c.eval_examples = 10, 200
  c.methods = tmp_methods
  opt = dict(lr=0.05, momentum=0.9, weight_decay=1e-4, schedule="cosine", optimizer="sgd")
  c.dense = ml_collections.ConfigDict(dict(steps=steps, opt=opt))
  c.deeptwist = ml_collections.ConfigDict(
    dict(method="tucker2", ratio=0.3, sd=7, steps=20, opt=opt)
  )
  c.finetune = ml_collections.ConfigDict(dict(method="tr", ratio=0.3, steps=10, opt=opt))
  c.seqkd = ml_collections.ConfigDict(
    dict(method="mtt", ratio=0.3, block_steps=5, e2e_steps=5, opt=opt)
  )
  c.e2ekd = ml_collections.ConfigDict(dict(method="cp", ratio=0.3, steps=5, opt=opt))
  c.scratch = ml_collections.ConfigDict(dict(method="svd", ratio=0.3, steps=5, opt=opt))
  return c


def test_tiny_run_learns_and_every_method_runs(tmp_path):
  ds = data_lib.synthetic()
  methods = ("dense", "deeptwist", "finetune", "seqkd", "e2ekd", "scratch", "deeptwist_auto")
  c = _config(methods)
  c.deeptwist_auto = ml_collections.ConfigDict(
    dict(
      kind="deeptwist",
      method="svd",
      ratio=0.3,
      sd_rule="quadratic",
      sd_recover=0.2,
      sd_batches=2,
      sd_max=3,
      bn_batches=3,
      steps=6,
      opt=c.deeptwist.opt,
    )
  )
  rows = run_lib.run(c, str(tmp_path), ds)
  by = {r["method"]: r for r in rows}
  assert by["dense"]["test_accuracy"] > 0.8  # 4 classes: chance is 0.25
  for name in ("deeptwist", "deeptwist_auto"):
    dt = by[name]
    # The last step is a distortion, so converting to the factorized form changes nothing.
    assert dt["test_accuracy"] == pytest.approx(dt["accuracy_before_conversion"], abs=1 / 256)
  auto = by["deeptwist_auto"]
  assert auto["kind"] == "deeptwist" and auto["method_detail"] == "svd"
  assert auto["sd_curvature"] > 0
  assert auto["sd"] == min(auto["sd_estimate"], 3)  # capped by sd_max
  assert auto["steps"] % auto["sd"] == 0 and 6 <= auto["steps"] < 6 + auto["sd"]
  for m in methods[1:]:
    assert by[m]["params"] < by["dense"]["params"]
  logged = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  results = {m["phase"]: m for m in logged if m.get("event") == "result"}
  assert results["deeptwist_auto"]["conv_ratio"] == pytest.approx(auto["conv_ratio"])
  assert 0 < auto["conv_ratio"] < 1 and by["dense"]["conv_ratio"] == 1.0
  assert {"params", "macs", "test_accuracy"} <= set(results["dense"])
  saved = json.loads((tmp_path / "results.json").read_text())
  assert [r["method"] for r in saved] == list(methods)
  assert {"method", "params", "macs", "test_accuracy"} <= set(saved[0])
  assert (tmp_path / "accuracy_vs_step.png").stat().st_size > 1000
  # Test-subset accuracy is logged during every phase (eval_every=10) and at its end.
  evals = [m for m in logged if "test_accuracy" in m and m.get("event") != "result"]
  assert {m["phase"] for m in evals} >= {"dense", "deeptwist", "seqkd_block0", "seqkd_e2e"}
  n_blocks = len({m["phase"] for m in logged if m["phase"].startswith("seqkd_block")})
  assert by["seqkd"]["steps"] == 5 * n_blocks + 5  # block_steps per block, then e2e_steps
  assert [m["step"] for m in evals if m["phase"] == "dense"] == [10, 20, 30, 40]
  # A finished workdir run again: the same rows, the training seconds kept (they come from
  # the checkpoints), no line added to the metrics log.
  for r in rows[1:]:
    assert r["train_s"] > 0 and r["wall_s"] >= r["train_s"]
  n_lines = len(logged)
  again = run_lib.run(c, str(tmp_path), ds)
  for r0, r1 in zip(rows, again, strict=True):
    assert r1["train_s"] == r0["train_s"] and r1["test_accuracy"] == r0["test_accuracy"]
    assert r1["wall_s"] >= r1["train_s"]
  assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == n_lines


def test_plots_show_the_logged_test_accuracy_per_method_on_one_step_axis(tmp_path):
  """Both figures from a small metrics file: each method's panel holds its phases' logged
  test accuracy, a phase's steps starting where the previous phase ended; DeepTwist's
  distortions are drawn in its panel only; the params figure puts each method at its
  share of conv weights kept, in percent."""
  log = [
    dict(phase="dense", step=10, loss=1.0, test_accuracy=0.5),
    dict(phase="dense", step=20, loss=0.5, test_accuracy=0.7),
    dict(phase="dense", event="result", test_accuracy=0.7),
    dict(phase="deeptwist", step=5, loss=0.9, distorted=False, test_accuracy=0.6),
    dict(phase="deeptwist", step=10, loss=0.8, distorted=True, test_accuracy=0.65),
    dict(phase="seqkd_block1", step=4, loss=0.1, test_accuracy=0.3),
    dict(phase="seqkd_block0", step=4, loss=0.2, test_accuracy=0.2),
    dict(phase="seqkd_block0", step=4, loss=0.2, test_accuracy=0.25),  # a resumed run's repeat
    dict(phase="seqkd_e2e", step=6, loss=0.3, test_accuracy=0.6),
    dict(phase="seqkd_e2e", step=3, loss=0.3),  # no evaluation at this step
  ]
  (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(m) for m in log) + "\nnot json\n")
  rows = [
    dict(method="dense", params=100, test_accuracy=0.7, conv_ratio=1.0),
    dict(method="deeptwist", kind="deeptwist", params=30, test_accuracy=0.66, conv_ratio=0.1,
         sd=5, steps=10),
    dict(method="seqkd", params=20, test_accuracy=0.61, conv_ratio=0.2),
  ]  # fmt: skip
  figs = run_lib.plots(str(tmp_path), rows)
  for name in ("accuracy_vs_step", "accuracy_vs_params"):
    assert (tmp_path / f"{name}.png").stat().st_size > 5000
  panels = {ax.get_title().split(":")[0]: ax for ax in figs["accuracy_vs_step"].axes}
  assert set(panels) == {"dense", "deeptwist", "seqkd"}

  def series(ax, gid=None):
    return {
      ln.get_label(): (list(ln.get_xdata()), list(ln.get_ydata()))
      for ln in ax.get_lines()
      if ln.get_gid() == gid
    }

  assert series(panels["dense"]) == {"dense": ([10, 20], [0.5, 0.7])}
  assert series(panels["seqkd"]) == {
    "seqkd_block0": ([4], [0.25]),
    "seqkd_block1": ([8], [0.3]),
    "seqkd_e2e": ([14], [0.6]),
  }
  assert series(panels["deeptwist"]) == {"deeptwist": ([5, 10], [0.6, 0.65])}

  def distortions(ax):
    return sorted(ln.get_xdata()[0] for ln in ax.get_lines() if ln.get_gid() == "distortion")

  assert distortions(panels["deeptwist"]) == [5, 10] and distortions(panels["seqkd"]) == []
  for ax in panels.values():  # the dense net's test accuracy as a dashed line
    assert series(ax, "dense") == {"dense (test)": ([0, 1], [0.7, 0.7])}
  (ax,) = figs["accuracy_vs_params"].axes
  pts = {c.get_label(): tuple(c.get_offsets()[0]) for c in ax.collections}
  assert pts == {"dense": (100.0, 0.7), "deeptwist": (10.0, 0.66), "seqkd": (20.0, 0.61)}
  assert "%" in ax.xaxis.get_major_formatter()(50, 0)


def _small_state(sd=0, plan=None):
  model = tnn.models.cnn(4, rngs=nnx.Rngs(0), widths=(4, 8, 8))
  groups = steps_lib.distortion_groups(model, plan) if plan else ()
  cfg = steps_lib.StepConfig(num_classes=4, mean=(0.5,), std=(0.3,), sd=sd, groups=groups)
  tx, _ = trainer.make_optimizer(dict(lr=0.05), 100)
  graphdef, state = steps_lib.init_state(model, tx, 0)
  return model, graphdef, tx, cfg, state


def test_train_step_does_not_retrace():
  _, graphdef, tx, cfg, state = _small_state()
  step = steps_lib.make_train_step(graphdef, tx, cfg)
  ds = data_lib.synthetic()
  for s in range(3):
    idx = data_lib.batch_indices(512, 32, 0, s)
    state, _ = step(state, (jnp.asarray(ds.train.images[idx]), jnp.asarray(ds.train.labels[idx])))
  assert step._cache_size() == 1


def test_distortions_happen_exactly_at_multiples_of_sd():
  model, graphdef, tx, _, state = _small_state()
  plan = tnn.make_plan(model, "tucker2", ratio=0.3)
  _, graphdef, tx, cfg, state = _small_state(sd=3, plan=plan)
  step = steps_lib.make_train_step(graphdef, tx, cfg)
  ds = data_lib.synthetic()
  path = plan.paths[0]
  lp = plan[path]
  for s in range(7):
    idx = data_lib.batch_indices(512, 32, 0, s)
    state, _ = step(state, (jnp.asarray(ds.train.images[idx]), jnp.asarray(ds.train.labels[idx])))
    w = tnn.layer_paths(nnx.merge(graphdef, state.params, state.rest))[path].kernel[...]
    lowrank = np.allclose(tnn.distort(w, lp), w, atol=1e-5)
    assert lowrank == ((s + 1) % 3 == 0), s
  assert int(state.refused) == 0


def test_non_finite_distortion_is_refused_and_counted():
  model = tnn.models.cnn(4, rngs=nnx.Rngs(0), widths=(4, 8, 8))
  plan = tnn.make_plan(model, "tucker2", ratio=0.3)
  path = plan.paths[0]
  layer = tnn.layer_paths(model)[path]
  layer.kernel[...] = layer.kernel[...].at[0, 0, 0, 0].set(jnp.nan)
  before = {
    p: np.asarray(m.kernel[...]) for p, m in tnn.layer_paths(model).items() if p in plan.paths
  }
  refused = steps_lib.distort_model(model, steps_lib.distortion_groups(model, plan))
  assert int(refused) >= 1
  np.testing.assert_array_equal(tnn.layer_paths(model)[path].kernel[...], before[path])


_WD_MOMENTUM = dict(lr=0.05, momentum=0.9, weight_decay=5e-4)  # both move unmasked params


def _changed_paths(old, new) -> list:
  """`(path, changed)` of every param leaf of two `nnx.State`s of the same model."""
  return [
    (path, not np.array_equal(np.asarray(a[...]), np.asarray(b[...])))
    for (path, a), (_, b) in zip(nnx.to_flat_state(old), nnx.to_flat_state(new), strict=True)
  ]


def test_seqkd_block_step_trains_only_its_block():
  """With weight decay and momentum (which move every unmasked param even where its loss
  gradient is zero, as BlockMSE's is outside the block), two steps change exactly the
  params of block 1."""
  model, graphdef, _, _, state = _small_state()
  tx, _ = trainer.make_optimizer(_WD_MOMENTUM, 100)
  _, state = steps_lib.init_state(model, tx, 0)
  cfg = steps_lib.StepConfig(num_classes=4, mean=(0.5,), std=(0.3,))
  mask = steps_lib.block_mask(state.params, 1)
  teacher = tnn.models.cnn(4, rngs=nnx.Rngs(1), widths=(4, 8, 8))
  step = steps_lib.make_train_step(graphdef, tx, cfg, mask, loss=steps_lib.BlockMSE(1))
  ds = data_lib.synthetic()
  old = jax.tree.map(np.asarray, state.params)
  for s in range(2):
    batch = (jnp.asarray(ds.train.images[32 * s : 32 * (s + 1)]), jnp.asarray(ds.train.labels[:32]))
    state, _ = step(state, batch, steps_lib.split_model(teacher))
  for path, changed in _changed_paths(old, state.params):
    assert changed == (path[:2] == ("blocks", 1)), path


def test_seqkd_phase_through_the_trainer_leaves_every_other_block_bitwise_unchanged(tmp_path):
  """`trainer.run_phase` with a BlockMSE loss (a Seq-KD stage), weight decay and momentum:
  every param outside the trained block is bitwise what it was; the block's params moved."""
  model = tnn.models.cnn(4, rngs=nnx.Rngs(0), widths=(4, 8, 8))
  teacher = tnn.models.cnn(4, rngs=nnx.Rngs(1), widths=(4, 8, 8))
  before = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
  cfg = steps_lib.StepConfig(num_classes=4, mean=(0.5,), std=(0.3,))
  out = trainer.run_phase(
    "seqkd_block1",
    str(tmp_path),
    model,
    data_lib.synthetic(),
    cfg=cfg,
    opt=_WD_MOMENTUM,
    steps=3,
    batch_size=32,
    seed=0,
    loss=steps_lib.BlockMSE(1),
    teacher=teacher,
  )
  after = nnx.state(out, nnx.Param)
  changed = _changed_paths(before, after)
  for path, moved in changed:
    assert moved == (path[:2] == ("blocks", 1)), path
  assert any(path[:2] == ("blocks", 1) for path, _ in changed)


def _bn_inputs(model, x, monkeypatch) -> list:
  """`(BatchNorm module, its input)` of each BatchNorm layer in one eval-mode call."""
  seen = []
  call = tnn.norm.BatchNorm.__call__

  def record(self, y, *a, **k):
    seen.append((self, np.asarray(y, np.float64)))
    return call(self, y, *a, **k)

  monkeypatch.setattr(tnn.norm.BatchNorm, "__call__", record)
  model.eval()
  model(x)
  monkeypatch.undo()
  return seen


def test_bn_recalibration_stores_the_statistics_computed_by_hand(monkeypatch):
  """One batch holding the whole split: every BatchNorm's stored mean and variance are the
  float64 mean and (biased) variance of its input, the recalibrated model run in eval mode
  (so each layer's input comes from the recalibrated layers before it). The input model
  keeps its own statistics (a copy is returned). With two half batches, the first layer's
  statistics are the average of the two halves' statistics, by hand."""
  model, _, _, cfg, _ = _small_state()
  ds = data_lib.synthetic()
  split = data_lib.Split(ds.train.images[:256], ds.train.labels[:256])
  x = data_lib.normalize(jnp.asarray(split.images), cfg.mean, cfg.std)
  old = jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat))
  new = trainer.recalibrate_bn(model, split, cfg, batches=1, batch_size=256, seed=0)
  layers = _bn_inputs(new, x, monkeypatch)
  assert len(layers) == 6  # stem and five stage convs of the small CNN
  for bn, y in layers:
    mean, var = y.mean(axis=(0, 1, 2)), y.var(axis=(0, 1, 2))
    np.testing.assert_allclose(bn.mean[...], mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(bn.var[...], var, rtol=1e-4, atol=1e-5)
  for (_, a), (_, b) in zip(
    nnx.to_flat_state(old), nnx.to_flat_state(nnx.state(model, nnx.BatchStat)), strict=True
  ):
    np.testing.assert_array_equal(a[...], b[...])  # the input model is untouched
  assert not np.allclose(old["stem"]["bn"]["mean"][...], layers[0][0].mean[...])  # changed
  # Two batches of 128: the average of the halves' statistics (first layer, by hand).
  two = trainer.recalibrate_bn(model, split, cfg, batches=2, batch_size=128, seed=0)
  (bn, _), *_ = _bn_inputs(two, x, monkeypatch)
  (_, y), *_ = _bn_inputs(new, x, monkeypatch)  # the first layer's input: weights only
  halves = [data_lib.batch_indices(256, 128, 1, b) for b in range(2)]
  np.testing.assert_allclose(
    bn.mean[...], np.mean([y[h].mean(axis=(0, 1, 2)) for h in halves], 0), rtol=1e-4, atol=1e-5
  )
  np.testing.assert_allclose(
    bn.var[...], np.mean([y[h].var(axis=(0, 1, 2)) for h in halves], 0), rtol=1e-4, atol=1e-5
  )
  with pytest.raises(ValueError, match="batches must be >= 1"):
    trainer.recalibrate_bn(model, split, cfg, batches=0, batch_size=256, seed=0)


def test_a_run_with_bn_batches_stores_recalibrated_statistics(tmp_path):
  """`bn_batches > 0` in a section recomputes the decomposed net's BatchNorm statistics
  before its training: after one fine-tuning step the stored statistics differ from those
  of the same run with `bn_batches = 0` (which keeps the dense net's)."""
  stats = {}
  for n in (0, 2):
    c = _config(("dense", "finetune"), steps=3)
    c.finetune.update(steps=1, bn_batches=n, method="tucker2")
    work = tmp_path / f"bn{n}"
    run_lib.run(c, str(work), data_lib.synthetic())
    _, arrays = ckpt_lib.latest_arrays(str(work / "finetune"))
    stats[n] = {k: a for k, a in arrays.items() if k.endswith(("/mean", "/var"))}
  assert stats[0] and stats[0].keys() == stats[2].keys()
  differ = [k for k in stats[0] if not np.array_equal(stats[0][k], stats[2][k])]
  assert len(differ) == len(stats[0]), sorted(set(stats[0]) - set(differ))


def test_data_parallel_over_two_devices():
  assert jax.device_count() == 2
  with pytest.raises(ValueError, match="does not divide over the 2 devices"):
    trainer.check_batch(33)


# --- configs and resume ------------------------------------------------------------------


@pytest.mark.parametrize(
  "edit,match",
  [
    (lambda c: setattr(c, "methods", ("dense", "magic")), "unknown method 'magic'"),
    (lambda c: setattr(c, "methods", ("dense", "dense")), "repeated entries"),
    (lambda c: setattr(c.deeptwist, "kind", "twist"), "config.deeptwist.kind is 'twist'"),
    (lambda c: setattr(c.deeptwist, "sd", 0), "sd must be >= 1"),
    (lambda c: setattr(c.deeptwist, "sd_rule", "cubic"), "sd_rule: unknown 'cubic'"),
    (lambda c: setattr(c.deeptwist, "bn_batches", -1), "bn_batches must be >= 0"),
    (lambda c: setattr(c.deeptwist, "sd_max", -1), "sd_max must be >= 0"),
    (lambda c: setattr(c.deeptwist, "forward", "fast"), "deeptwist.forward: 'fast'; allowed"),
    (lambda c: setattr(c.deeptwist, "choose_steps", 0), "deeptwist.choose_steps must be >= 1"),
    (lambda c: setattr(c, "model", "alexnet"), "unknown 'alexnet'"),
    (lambda c: setattr(c, "batch_size", 33), "does not divide"),
    (lambda c: setattr(c, "eval_examples", -1), r"config.eval_examples must be in \[1, inf\)"),
    (lambda c: setattr(c, "eval_examples", 0), r"config.eval_examples must be in \[1, inf\)"),
    (lambda c: setattr(c, "eval_every", -5), r"config.eval_every must be in \[0, inf\).*0: no"),
    (lambda c: setattr(c, "log_every", 0), r"config.log_every must be in \[1, inf\)"),
    (lambda c: setattr(c, "checkpoint_every", 0), r"config.checkpoint_every must be in"),
    (lambda c: setattr(c, "keep", 0), r"config.keep must be in \[1, inf\)"),
    (lambda c: c.dense.opt.update(lr=0.0), r"config.dense.opt.lr must be in \(0, inf\), got 0.0"),
    (lambda c: c.dense.opt.update(lr=float("nan")), r"config.dense.opt.lr must be in .*nan"),
    (lambda c: c.dense.opt.update(momentum=1.0), r"config.dense.opt.momentum must be in \[0, 1\)"),
    (lambda c: c.dense.opt.update(weight_decay=-1e-4), r"opt.weight_decay must be in \[0, inf\)"),
    (lambda c: c.deeptwist.update(alpha=1.5), r"config.deeptwist.alpha must be in \[0, 1\]"),
    (lambda c: c.deeptwist.update(temperature=0.0), r"deeptwist.temperature must be in \(0, inf"),
  ],
)
def test_bad_configs_fail_before_compute(tmp_path, edit, match):
  c = _config(("dense", "deeptwist"))
  edit(c)
  with pytest.raises(ValueError, match=match):
    run_lib.run(c, str(tmp_path), data_lib.synthetic())


@pytest.mark.parametrize(
  "edit,match",
  [
    (
      lambda c: c.finetune.update(
        method="tucker2", overrides='{"blocks.1.layers.0.conv": {"ranks": [99, 2]}}'
      ),
      "exceeds",
    ),
    (lambda c: c.finetune.update(method="magic"), "config.finetune: .*unknown method 'magic'"),
    (lambda c: c.finetune.update(ratio=1.5), "ratio must be in"),
    (lambda c: c.finetune.update(overrides="{not json"), "overrides must be a JSON"),
    (lambda c: c.finetune.update(layers=("nowhere.*",)), "matches no layer"),
  ],
)
def test_bad_plans_fail_before_training(tmp_path, edit, match):
  c = _config(("dense", "finetune"), steps=2)
  edit(c)
  with pytest.raises(ValueError, match=match):
    run_lib.run(c, str(tmp_path), data_lib.synthetic())
  assert not (tmp_path / "dense").exists()  # no step was taken


def _final_params(workdir):
  from train import checkpoint

  step, arrays = checkpoint.latest_arrays(os.path.join(workdir, "dense"))
  return step, [arrays[k] for k in sorted(arrays)]


SCRIPT = """
import sys, jax
jax.config.update("jax_numpy_dtype_promotion", "standard")
sys.path.insert(0, {repo!r})
from tests.test_train import _config
from train import data, run
c = _config(("dense",), steps=60)
c.checkpoint_every = 3
run.run(c, sys.argv[1], data.synthetic())
"""


def test_killed_run_resumes_to_the_same_parameters(tmp_path):
  """Kill a real training process mid-run, start it again, compare with an uninterrupted run."""
  script = tmp_path / "job.py"
  script.write_text(SCRIPT.format(repo=REPO))
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  full, killed = tmp_path / "full", tmp_path / "killed"
  subprocess.run([sys.executable, str(script), str(full)], check=True, env=env, capture_output=True)
  proc = subprocess.Popen(
    [sys.executable, str(script), str(killed)],
    env=env,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  metrics = killed / "metrics.jsonl"
  deadline = time.time() + 240
  while time.time() < deadline:  # kill once it has logged a few steps (mid-run)
    if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
      break
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  step_at_kill = len(metrics.read_text().splitlines()) * 5
  assert step_at_kill < 60, "the run finished before it was killed"
  subprocess.run(
    [sys.executable, str(script), str(killed)], check=True, env=env, capture_output=True
  )
  s1, a = _final_params(str(full))
  s2, b = _final_params(str(killed))
  assert s1 == s2 == 60
  for x, y in zip(a, b, strict=True):
    np.testing.assert_array_equal(x, y)  # bitwise


def test_augment_is_the_reference_crop_and_flip_also_sharded():
  ds = data_lib.synthetic()
  x = data_lib.normalize(jnp.asarray(ds.train.images[:8]), (0.5,), (0.3,))
  key = jax.random.key(3)
  got = data_lib.augment(key, x, crop_pad=2, flip=True)
  k1, k2 = jax.random.split(key)
  offs = np.asarray(jax.random.randint(k1, (8, 2), 0, 5))
  flips = np.asarray(jax.random.bernoulli(k2, 0.5, (8,)))
  xp = np.pad(np.asarray(x), ((0, 0), (2, 2), (2, 2), (0, 0)))
  for i in range(8):
    want = xp[i, offs[i, 0] : offs[i, 0] + 12, offs[i, 1] : offs[i, 1] + 12]
    np.testing.assert_array_equal(got[i], want[:, ::-1] if flips[i] else want)
  mesh = jax.make_mesh((2,), ("data",))
  xs = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
  aug = jax.jit(lambda k, v: data_lib.augment(k, v, crop_pad=2, flip=True))
  np.testing.assert_array_equal(aug(key, xs), got)


def _conv_operand_dtypes(jaxpr) -> set:
  """dtypes of the operands of every conv in a jaxpr, sub-jaxprs (jit, cond, vjp) included."""
  out = set()
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "conv_general_dilated":
      out |= {v.aval.dtype for v in eqn.invars}
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      out |= _conv_operand_dtypes(sub)
  return out


def test_bfloat16_compute_runs_the_convs_in_bfloat16():
  """compute_dtype='bfloat16' puts every conv in bf16 (params stay float32) and tracks the
  float32 loss to bf16 accuracy; float32 keeps every conv in float32."""
  model = tnn.compress(
    tnn.models.cnn(4, rngs=nnx.Rngs(0), widths=(4, 8, 8)),
    tnn.make_plan(tnn.models.cnn(4, rngs=nnx.Rngs(0), widths=(4, 8, 8)), "tucker2", ratio=0.5),
  )
  ds = data_lib.synthetic()
  batch = (jnp.asarray(ds.train.images[:32]), jnp.asarray(ds.train.labels[:32]))
  losses = {}
  for dt in ("float32", "bfloat16"):
    cfg = steps_lib.StepConfig(num_classes=4, mean=(0.5,), std=(0.3,), compute_dtype=dt)
    tx, _ = trainer.make_optimizer(dict(lr=0.05), 10)
    graphdef, state = steps_lib.init_state(model, tx, 0)
    state = jax.tree.map(jnp.copy, state)  # the step donates it; `model` is used again
    step = steps_lib.make_train_step(graphdef, tx, cfg)
    kinds = _conv_operand_dtypes(jax.make_jaxpr(step)(state, batch).jaxpr)
    assert kinds == {jnp.dtype(dt)}, (dt, kinds)
    new, metrics = step(state, batch)
    losses[dt] = float(metrics["loss"])
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(new.params))
  assert losses["bfloat16"] == pytest.approx(losses["float32"], rel=2e-2)


def test_global_batch_is_the_batch_sharded_over_the_devices():
  mesh = jax.make_mesh((2,), ("data",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  split = data_lib.Split(np.arange(20 * 3, dtype=np.uint8).reshape(20, 3), np.arange(20))
  idx = np.array([9, 2, 17, 4, 0, 11, 5, 8])
  rows, x, _ = trainer.read_local(split, idx, sharding)
  np.testing.assert_array_equal(rows, np.arange(8))  # one process holds both devices
  g = trainer.global_batch(8, rows, x, sharding)
  want = split.images[idx]
  np.testing.assert_array_equal(np.asarray(g), want)
  assert g.sharding == sharding
  shards = sorted((s.index[0].start, np.asarray(s.data).tolist()) for s in g.addressable_shards)
  assert shards == [(0, want[:4].tolist()), (4, want[4:].tolist())]


def test_global_batch_from_a_process_s_own_rows():
  """A process that holds some rows of the batch fills its shards from those rows only."""
  mesh = jax.make_mesh((2,), ("data",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  x = np.arange(8 * 2, dtype=np.int32).reshape(8, 2)
  rows = np.array([0, 1, 2, 3, 4, 5, 6, 7])
  order = np.array([3, 0, 7, 1, 6, 2, 5, 4])  # rows handed over in any order
  g = trainer.global_batch(8, rows[order], x[order], sharding)
  np.testing.assert_array_equal(np.asarray(g), x)


def test_evaluate_counts_every_row_once_over_the_devices():
  """Sharded evaluation (2 devices) with a split and batch that do not divide: the padded
  rows never count, every real row counts once (reference: one unsharded forward)."""
  from flax import nnx

  import tnn

  ds = data_lib.synthetic(n_train=64, n_test=37)
  model = tnn.models.cnn(4, rngs=nnx.Rngs(1), in_channels=1, widths=(4, 8, 8))
  cfg = steps_lib.StepConfig(num_classes=4, mean=ds.mean, std=ds.std)
  g, p, r = steps_lib.split_model(model)
  model.eval()
  logits = model(data_lib.normalize(jnp.asarray(ds.test.images), ds.mean, ds.std))
  want = float(np.mean(np.argmax(np.asarray(logits), -1) == ds.test.labels))
  assert 0 < want < 1
  for batch in (5, 10, 37, 1000):
    assert trainer.evaluate(g, p, r, ds.test, cfg, batch=batch) == want
  right = np.flatnonzero(np.argmax(np.asarray(logits), -1) == ds.test.labels)
  right = right[: len(right) - 1 + len(right) % 2]  # an odd count: the last batch is padded
  split = data_lib.Split(ds.test.images[right], ds.test.labels[right])
  assert trainer.evaluate(g, p, r, split, cfg, batch=4) == 1.0  # padding would exceed 1


def test_onecycle_schedule_and_momentum_are_pytorchs():
  """The RSDTR recipe's OneCycleLR (PyTorch defaults: cosine, 30% warm-up, momentum cycled
  0.95 -> 0.85 -> 0.95), against torch itself."""
  torch = pytest.importorskip("torch")
  n = 200
  p = torch.nn.Parameter(torch.zeros(1))
  opt = torch.optim.SGD([p], lr=0.01, momentum=0.9)
  sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.01, total_steps=n)
  lrs, moms = [], []
  for _ in range(n):
    lrs.append(opt.param_groups[0]["lr"])
    moms.append(opt.param_groups[0]["momentum"])
    opt.step()
    sched.step()
  _, ours = trainer.make_optimizer(dict(lr=0.01, schedule="onecycle"), n)
  mom = trainer.onecycle_momentum(n, 0.85, 0.95)
  np.testing.assert_allclose([float(ours(i)) for i in range(n)], lrs, rtol=1e-4, atol=1e-9)
  np.testing.assert_allclose([float(mom(i)) for i in range(n)], moms, rtol=1e-5)


def test_distillation_loss_is_hintons_against_float64():
  """`alpha T^2 CE(softmax(t / T), s / T) + (1 - alpha) CE(labels, s)`, checked against numpy
  in float64 at an alpha and temperature where swapping or dropping a term shows."""
  rng = np.random.default_rng(0)
  s, t = rng.standard_normal((2, 6, 5)) * 3
  labels = rng.integers(0, 5, 6)
  cfg = steps_lib.StepConfig(num_classes=5, mean=(0.5,), std=(0.3,))
  loss = steps_lib.Distillation(alpha=0.7, temperature=3.0)
  got, logits = loss(lambda x: jnp.asarray(s, jnp.float32), None, jnp.asarray(labels), t, cfg)

  def log_softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))

  soft = np.exp(log_softmax(t / 3.0))
  kd = -(soft * log_softmax(s / 3.0)).sum(axis=1).mean() * 9.0
  ce = -log_softmax(s)[np.arange(6), labels].mean()
  np.testing.assert_allclose(float(got), 0.7 * kd + 0.3 * ce, rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(logits), np.float32(s))


class _Unreadable(data_lib.Split):
  """A split that fails the test if anything reads a row of it."""

  def take(self, idx, aug_seed=None):
    raise AssertionError("the test split was read")


def test_hold_out_moves_the_last_training_rows_to_validation():
  ds = data_lib.synthetic()
  held = data_lib.hold_out(ds, 64)
  np.testing.assert_array_equal(held.validation.images, ds.train.images[-64:])
  np.testing.assert_array_equal(held.train.labels, ds.train.labels[:-64])
  assert held.train.num_examples + held.validation.num_examples == ds.train.num_examples
  assert data_lib.hold_out(ds, 0) is ds
  with pytest.raises(ValueError, match=r"config.validation must be in \[0, 511\]"):
    data_lib.hold_out(ds, 512)


def test_a_run_evaluated_on_validation_never_reads_the_test_split(tmp_path):
  """`validation=N, eval_on="validation"`: training on the first rows, every evaluation
  (curves and result rows) on the held-out rows, and not one row of the test split read."""
  ds = data_lib.synthetic()
  ds = ds._replace(test=_Unreadable(ds.test.images, ds.test.labels))
  c = _config(("dense",), steps=4)
  c.validation, c.eval_on, c.eval_every = 128, "validation", 2
  rows = run_lib.run(c, str(tmp_path), ds)
  assert rows[0]["evaluated_on"] == "validation" and "test_accuracy" not in rows[0]
  assert 0 <= rows[0]["validation_accuracy"] <= 1
  logged = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert any("validation_accuracy" in r for r in logged if "step" in r)
  c.eval_on = "validation"
  c.validation = 0
  with pytest.raises(ValueError, match="eval_on='validation' needs a held-out split"):
    run_lib.run(c, str(tmp_path / "x"), ds)


def test_cpu_conv_auto_is_onednn_where_the_plugin_loads_else_xla(monkeypatch, tmp_path, capsys):
  c = _config(("dense",), steps=2)
  c.cpu_conv = "auto"
  monkeypatch.setattr(run_lib, "_onednn_status", lambda: (False, "no plugin here"))
  assert run_lib.resolve_cpu_conv(c) == ("xla", "auto: no plugin here")
  run_lib.run(c, str(tmp_path / "a"), data_lib.synthetic())
  assert "convolutions on the CPU: xla (auto: no plugin here)" in capsys.readouterr().out
  c.cpu_conv = "onednn"  # asked for explicitly where it is missing: a clear error
  with pytest.raises(ValueError, match="config.cpu_conv='onednn': no plugin here"):
    run_lib.run(c, str(tmp_path / "b"), data_lib.synthetic())
  monkeypatch.setattr(run_lib, "_onednn_status", lambda: (True, "/lib/x.so"))
  c.cpu_conv = "auto"
  assert run_lib.resolve_cpu_conv(c)[0] == "onednn"
  c.cpu_conv = "bogus"
  with pytest.raises(ValueError, match="config.cpu_conv: 'bogus'; allowed auto, "):
    run_lib.run(c, str(tmp_path / "c"), data_lib.synthetic())
