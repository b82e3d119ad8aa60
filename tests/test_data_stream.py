"""Streamed splits (`train.data.Streamed`): tfds data sources read a batch at a time,
cropped and resized on the host, validated, independent of which rows a process reads."""

import types

import jax
import numpy as np
import pytest
from PIL import Image

from train import data as data_lib
from train import steps as steps_lib
from train import trainer


class FakeSource:
  """A tfds data source's interface (`len`, `[i]`, `dataset_info.features`) over arrays."""

  def __init__(self, images, labels, num_classes, channels, fail_at=None):
    self.images, self.labels, self.fail_at = images, labels, fail_at
    label = types.SimpleNamespace(num_classes=num_classes)
    image = types.SimpleNamespace(shape=(None, None, channels))
    self.dataset_info = types.SimpleNamespace(features={"image": image, "label": label})

  def __len__(self):
    return len(self.labels)

  def __getitem__(self, i):
    if i == self.fail_at:
      raise OSError("truncated ArrayRecord chunk")
    return {"image": self.images[i], "label": self.labels[i]}


def _varied(n=12, channels=3, seed=0):
  rng = np.random.default_rng(seed)
  images = [
    rng.integers(0, 256, (int(rng.integers(9, 40)), int(rng.integers(9, 40)), channels), np.uint8)
    for _ in range(n)
  ]
  return images, rng.integers(0, 5, n)


def _streamed(images, labels, size=16, channels=3, **kw):
  src = FakeSource(images, labels, 5, channels)
  return data_lib.Streamed(
    src, where="fake/train", size=size, num_classes=5, channels=channels, **kw
  )


def test_eval_crop_is_the_central_square_resized():
  images, labels = _varied()
  split = _streamed(images, labels, size=16)
  x, y = split.take(np.arange(len(labels)))
  assert x.shape == (len(labels), 16, 16, 3) and x.dtype == np.uint8
  np.testing.assert_array_equal(y, labels)
  for i, (im, got) in enumerate(zip(images, x, strict=True)):
    h, w = im.shape[:2]
    side = round(0.875 * min(h, w))
    box = split._box(h, w, i, None)
    assert box == ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
    want = Image.fromarray(im).resize((16, 16), Image.Resampling.BILINEAR, box=box)
    np.testing.assert_array_equal(got, np.asarray(want))


def test_train_crops_are_inception_crops_fixed_by_seed_and_example():
  images, labels = _varied(n=6)
  split = _streamed(images, labels)
  for i in range(6):
    h, w = images[i].shape[:2]
    for step in range(40):
      x0, y0, x1, y1 = split._box(h, w, i, (3, step))
      cw, ch = x1 - x0, y1 - y0
      assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
      central = cw == ch == min(h, w)  # the fallback when no draw fits
      assert central or (0.08 * h * w * 0.8 <= cw * ch <= h * w)
      assert central or 3 / 4 / 1.5 <= cw / ch <= 4 / 3 * 1.5  # rounding of small crops
  a, _ = split.take(np.array([4, 1, 3]), (7, 2))
  b, _ = split.take(np.array([3]), (7, 2))  # another process's rows: the same crops
  np.testing.assert_array_equal(a[2], b[0])
  c, _ = split.take(np.array([3]), (7, 3))  # another step: another crop
  assert not np.array_equal(b, c)


def test_grayscale_and_full_box_is_exact():
  """One channel stays one; a full-image crop to the same size is the image itself."""
  images = [np.random.default_rng(i).integers(0, 256, (12, 12, 1), np.uint8) for i in range(4)]
  split = _streamed(images, np.arange(4) % 5, size=12, channels=1, area=(1, 1), aspect=(1, 1))
  x, _ = split.take(np.arange(4), (0, 0))
  np.testing.assert_array_equal(x, np.stack(images))


@pytest.mark.parametrize(
  "bad, match",
  [
    (dict(fail_at=2), r"fake/train\[2\]: unreadable record \(OSError"),
    (dict(label=7), r"fake/train\[1\]: label 7 outside \[0, 4\]"),
    (dict(channels=1), r"fake/train\[0\]: image \(\d+, \d+, 3\) uint8; expected \(h, w, 1\)"),
  ],
)
def test_bad_records_are_named(bad, match):
  images, labels = _varied(n=4)
  if "label" in bad:
    labels = labels.copy()
    labels[1] = bad["label"]
  src = FakeSource(images, labels, 5, 3, fail_at=bad.get("fail_at"))
  ch = bad.get("channels", 3)
  split = data_lib.Streamed(src, where="fake/train", size=8, num_classes=5, channels=ch)
  with pytest.raises(ValueError, match=match):
    split.take(np.arange(4))


@pytest.mark.parametrize(
  "kw, match",
  [
    (dict(size=0), "image_size must be >= 1, got 0"),
    (dict(crop=1.5), r"crop must be in \(0, 1\], got 1.5"),
    (dict(area=(0.5, 0.2)), "area must be"),
  ],
)
def test_bad_streaming_arguments(kw, match):
  images, labels = _varied(n=2)
  args = dict(size=8) | kw
  with pytest.raises(ValueError, match=match):
    _streamed(images, labels, **args)


def test_tfds_data_source_streams(monkeypatch):
  """The real tfds reader (mocked records of ImageNet's features, varied sizes): no
  download attempted, ImageNet's validation split as the eval split, stats estimated."""
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=6):
    ds = data_lib.load("tfds:imagenet2012", image_size=24, eval_split="validation")
    assert ds.num_classes == 1000 and ds.train.image_shape == (24, 24, 3)
    assert ds.test.where == "tfds:imagenet2012/validation"
    x, y = ds.train.take(np.array([5, 0]), (0, 1))
    assert x.shape == (2, 24, 24, 3) and x.dtype == np.uint8 and y.dtype == np.int32
    assert all(0 <= v < 1000 for v in y)
    # The stats: float64 mean and std over the 6 records' central crops, each crop's box
    # written out here from its definition (0.875 of the shorter side, centred).
    crops = []
    for i in range(6):
      im = np.asarray(ds.train.source[i]["image"])
      h, w = im.shape[:2]
      side = max(1, round(0.875 * min(h, w)))
      box = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
      crop = Image.fromarray(im).resize((24, 24), Image.Resampling.BILINEAR, box=box)
      crops.append(np.asarray(crop, np.float64) / 255)
    crops = np.stack(crops)
    np.testing.assert_allclose(ds.mean, crops.mean(axis=(0, 1, 2)), rtol=1e-12)
    np.testing.assert_allclose(ds.std, crops.std(axis=(0, 1, 2)), rtol=1e-12)
  with pytest.raises(ValueError, match="image_size=24 is for tfds"):
    data_lib.load("fashion_mnist", image_size=24)


def test_training_on_a_streamed_split_equals_in_memory(tmp_path):
  """run_phase reads a Streamed split through the same batches as the in-memory one: with
  full-image crops (an identity resize) the trained parameters are bitwise equal."""
  ds = data_lib.synthetic(n_train=96, n_test=32, size=12, num_classes=4)
  src = FakeSource(list(ds.train.images), ds.train.labels, 4, 1)
  streamed = data_lib.Streamed(
    src, where="fake", size=12, num_classes=4, channels=1, area=(1, 1), aspect=(1, 1), workers=3
  )
  cfg = steps_lib.StepConfig(num_classes=4, mean=ds.mean, std=ds.std, crop_pad=0, flip=False)
  out = []
  for split, where in ((ds.train, "mem"), (streamed, "stream")):
    # Flax's BatchNorm promotes with float32 internally (refused by strict promotion).
    with jax.numpy_dtype_promotion("standard"):
      out.append(_train(split, where, ds, cfg, tmp_path))
  for a, b in zip(*out, strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert any(np.any(np.asarray(a) != 0) for a in out[0])


def _train(split, where, ds, cfg, tmp_path):
  from flax import nnx

  import tnn

  model = tnn.models.cnn(4, rngs=nnx.Rngs(0), in_channels=1, widths=(4, 8, 8))
  dset = data_lib.Dataset("t", split, ds.test, 4, ds.mean, ds.std)
  kw = dict(cfg=cfg, opt=dict(lr=0.05, momentum=0.9), steps=6, batch_size=16, seed=1)
  trained = trainer.run_phase(where, str(tmp_path / where), model, dset, **kw)
  return jax.tree.leaves(nnx.state(trained, nnx.Param))


def test_a_run_streams_a_tfds_dataset(tmp_path):
  """`run.run` with `dataset=tfds:...` and `image_size`: the streamed loader, the
  model's input shape from it, training and evaluation on `eval_split`."""
  tfds = pytest.importorskip("tensorflow_datasets")
  import json

  from tests.test_train import _config
  from train import run as run_lib

  c = _config(("dense",), steps=3)
  c.dataset, c.image_size, c.eval_split, c.batch_size = "tfds:imagenet2012", 16, "validation", 8
  with tfds.testing.mock_data(num_examples=20), jax.numpy_dtype_promotion("standard"):
    rows = run_lib.run(c, str(tmp_path))
  (row,) = json.loads((tmp_path / "results.json").read_text())
  assert row == rows[0] and row["method"] == "dense"
  from flax import nnx

  import tnn

  want = tnn.models.cnn(1000, rngs=nnx.Rngs(0), in_channels=3, widths=(4, 8, 8))
  assert row["params"] == tnn.report(want, (1, 16, 16, 3))["params"]
  assert row["test_accuracy"] * 20 == round(row["test_accuracy"] * 20)  # 20 images
