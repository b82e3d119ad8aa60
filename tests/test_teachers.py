"""The teachers kept in `teachers/`: each loads into its model and scores, on a fixed slice
of the Fashion-MNIST test set, the accuracy recorded with it."""

import glob
import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

import tnn
from train import data as data_lib
from train import steps as steps_lib
from train import teacher, trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = sorted(glob.glob(os.path.join(REPO, "teachers", "*.npz")))


@pytest.fixture(autouse=True)
def _standard_promotion():
  with jax.numpy_dtype_promotion("standard"):
    yield


def _fashion():
  try:
    return data_lib.load("fashion_mnist")
  except ValueError as e:  # CI installs Debian's dataset-fashion-mnist (.ci/run)
    pytest.skip(f"Fashion-MNIST not installed: {e}")


def test_every_teacher_is_recorded():
  assert FILES, "no teacher in teachers/"
  for path in FILES:
    _, meta = teacher.read(path)
    for key in (
      "model",
      "dataset",
      "test_accuracy",
      "test_accuracy_first",
      "command",
      "machine",
      "date",
    ):
      assert key in meta, (path, key)


@pytest.mark.parametrize("path", FILES, ids=[os.path.basename(f) for f in FILES])
def test_teacher_scores_its_recorded_accuracy(path):
  _, meta = teacher.read(path)
  ds = _fashion()
  model = tnn.models.MODELS[meta["model"]](
    ds.num_classes, rngs=nnx.Rngs(7), in_channels=1, **meta.get("model_kwargs", {})
  )
  model = teacher.load_into(model, path)
  cfg = steps_lib.StepConfig(
    num_classes=ds.num_classes, mean=tuple(ds.mean), std=tuple(ds.std), pad_to=meta.get("pad_to")
  )
  n = meta["test_accuracy_first"]["images"]
  split = data_lib.Split(ds.test.images[:n], ds.test.labels[:n])
  g, p, r = steps_lib.split_model(model)
  acc = trainer.evaluate(g, p, r, split, cfg)
  # XLA compiles for the CPU it runs on, so a handful of borderline images may flip.
  assert acc == pytest.approx(meta["test_accuracy_first"]["accuracy"], abs=3 / n), json.dumps(meta)[
    :300
  ]


def test_a_teacher_that_does_not_fit_the_model_is_named(tmp_path):
  path = FILES[0]
  _, meta = teacher.read(path)
  wrong = tnn.models.cnn(10, rngs=nnx.Rngs(0), in_channels=1, widths=(8, 16, 32))
  with pytest.raises(ValueError, match=r"entry 'params/.*' has shape .* the model's is"):
    teacher.load_into(wrong, path)
  with open(path, "rb") as f:
    blob = bytearray(f.read())
  blob[len(blob) // 2 : len(blob) // 2 + 32] = b"\x00" * 32
  (tmp_path / "bad.npz").write_bytes(bytes(blob))
  with pytest.raises(ValueError, match="checksum|not a readable teacher"):
    teacher.read(str(tmp_path / "bad.npz"))


def test_the_decomposition_benchmark_reads_every_conv_kernel_of_a_teacher():
  """`benchmarks.decomp` on a teacher: exactly the file's conv kernels, in layer order."""
  from benchmarks import decomp as bench

  path = os.path.join(REPO, "teachers", "lenet5_fmnist.npz")
  name, kernels = bench.net_kernels(path)
  arrays, _ = teacher.read(path)
  convs = [k for k in arrays if k.endswith("kernel") and arrays[k].ndim == 4]
  assert name == "teacher:lenet5_fmnist.npz" and len(kernels) == len(convs) == 2
  assert sorted(k.shape for k in kernels) == sorted(arrays[k].shape for k in convs)
  for k in kernels:
    assert any(np.array_equal(k, arrays[c]) for c in convs)
