"""Datasets, a deterministic batch order, device augmentation.

Readers: IDX `.gz` (MNIST, Fashion-MNIST), the CIFAR-10/100 binary version (folder or
tarball, no pickle), and any prepared tfds dataset (`tensorflow_datasets` imported only
there). Every reader checks magic numbers, sizes, counts and label ranges, so a corrupt or
truncated file is a `ValueError` naming the file, never a half-read dataset.

A split is held in memory (`Split`) or, for data sets too large for that (ImageNet),
read record by record when a batch asks for it (`Streamed`: a tfds data source, images
decoded, cropped and resized on the host by a thread pool). Both answer `take(idx,
aug_seed)` with `(images uint8 (k, H, W, C), labels int32 (k,))`, so the training loop
reads only the rows of a batch that its process holds.

The batch order is a pure function of `(seed, epoch, index)`: a checkpoint that stores the
step therefore stores the data position, and a resumed run sees the same batches.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import tarfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np

DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
_IDX_FILES = {
  "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
  "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_EXPECTED = {"train": 60000, "test": 10000}


class SplitLike(Protocol):
  """What training and evaluation read from a split: `Split` (in memory) and `Streamed`."""

  @property
  def num_examples(self) -> int: ...

  @property
  def image_shape(self) -> tuple: ...

  def take(self, idx, aug_seed=None) -> tuple[np.ndarray, np.ndarray]: ...


class Split(NamedTuple):
  """`images (N, H, W, C) uint8`, `labels (N,) int32`, in memory."""

  images: np.ndarray
  labels: np.ndarray

  @property
  def num_examples(self) -> int:
    return len(self.labels)

  @property
  def image_shape(self) -> tuple:
    return tuple(self.images.shape[1:])

  def take(self, idx, aug_seed=None) -> tuple[np.ndarray, np.ndarray]:
    """Rows `idx` (an index array or a slice); `aug_seed` is for `Streamed`'s host crops."""
    del aug_seed
    return self.images[idx], self.labels[idx]


class Head(NamedTuple):
  """The first `n` examples of `split`, read lazily (each process reads only the rows it
  is asked for): the fixed test subset evaluated during training."""

  split: SplitLike
  n: int

  @property
  def num_examples(self) -> int:
    return min(self.n, self.split.num_examples)

  @property
  def image_shape(self) -> tuple:
    return self.split.image_shape

  def take(self, idx, aug_seed=None) -> tuple[np.ndarray, np.ndarray]:
    return self.split.take(idx, aug_seed)


class Dataset(NamedTuple):
  name: str
  train: SplitLike
  test: SplitLike
  num_classes: int
  mean: tuple
  std: tuple
  validation: SplitLike | None = None  # held out of `train` (`hold_out`), if any


def hold_out(ds: Dataset, n: int) -> Dataset:
  """`ds` with the last `n` training examples moved to `validation` (0: `ds` as is).

  The split on which hyper-parameters are chosen, so that the test split is read once per
  final result (for Fashion-MNIST the fidelity study holds out the last 5,000 of 60,000).
  The rows are the last `n` in the file's order, the same on every machine and run."""
  if not n:
    return ds
  if not isinstance(ds.train, Split):
    raise ValueError(
      f"config.validation: a hold-out needs an in-memory training split; {ds.name} is "
      "streamed. Use its own validation split (config.eval_split) instead."
    )
  total = ds.train.num_examples
  if not 0 < n < total:
    raise ValueError(f"config.validation must be in [0, {total - 1}] for {ds.name}, got {n}.")
  images, labels = ds.train.images, ds.train.labels
  return ds._replace(
    train=Split(images[:-n], labels[:-n]), validation=Split(images[-n:], labels[-n:])
  )


# --- IDX (MNIST, Fashion-MNIST) -------------------------------------------------------


def _gunzip(path: str) -> bytes:
  try:
    with gzip.open(path, "rb") as f:
      return f.read()
  except (OSError, EOFError, zlib.error) as e:
    raise ValueError(f"{path}: not a complete gzip file ({e}).") from None


def read_idx(path: str, *, ndim: int) -> np.ndarray:
  """An IDX array of unsigned bytes (type 0x08) with `ndim` dimensions, fully validated."""
  if path.endswith(".gz"):
    raw = _gunzip(path)
  else:
    with open(path, "rb") as f:
      raw = f.read()
  if len(raw) < 4 + 4 * ndim:
    raise ValueError(f"{path}: {len(raw)} bytes is too short for an IDX header.")
  zero, dtype, nd = struct.unpack(">HBB", raw[:4])
  if zero != 0 or dtype != 0x08 or nd != ndim:
    raise ValueError(
      f"{path}: bad IDX magic (zero={zero}, type={dtype:#x}, ndim={nd}); expected "
      f"0, 0x08 (unsigned byte), {ndim}."
    )
  dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
  body = raw[4 + 4 * ndim :]
  if len(body) != int(np.prod(dims)):
    raise ValueError(
      f"{path}: header says {dims} = {int(np.prod(dims))} bytes, file has {len(body)}."
    )
  return np.frombuffer(body, np.uint8).reshape(dims)


def find_idx_dir(data_dir: str | None) -> str:
  """`data_dir`, or Debian's Fashion-MNIST folder; a clear error saying how to get it."""
  for d in [data_dir] if data_dir else [DEBIAN_FASHION_MNIST]:
    if d and all(os.path.exists(os.path.join(d, f)) for pair in _IDX_FILES.values() for f in pair):
      return d
  where = data_dir or DEBIAN_FASHION_MNIST
  raise ValueError(
    f"data: the four IDX .gz files ({', '.join(f for p in _IDX_FILES.values() for f in p)}) "
    f"are not in {where}. Install them with `sudo apt-get install -y dataset-fashion-mnist` "
    f"(Debian/Ubuntu; files in {DEBIAN_FASHION_MNIST}) or point --config.data_dir at a folder "
    "holding them."
  )


def load_idx(name: str, data_dir: str | None = None) -> Dataset:
  """MNIST or Fashion-MNIST (same format) from `data_dir` or Debian's folder."""
  d = find_idx_dir(data_dir)
  splits = {}
  for split, (img_file, lab_file) in _IDX_FILES.items():
    images = read_idx(os.path.join(d, img_file), ndim=3)
    labels = read_idx(os.path.join(d, lab_file), ndim=1)
    if images.shape[0] != labels.shape[0] or images.shape[0] != _EXPECTED[split]:
      raise ValueError(
        f"{d}/{img_file}: {images.shape[0]} images and {labels.shape[0]} labels; "
        f"{name} {split} has {_EXPECTED[split]}."
      )
    if images.shape[1:] != (28, 28):
      raise ValueError(f"{d}/{img_file}: images are {images.shape[1:]}, expected (28, 28).")
    _check_labels(labels, 10, f"{d}/{lab_file}")
    splits[split] = Split(images[..., None], labels.astype(np.int32))
  stats = {"fashion_mnist": ((0.2860,), (0.3530,)), "mnist": ((0.1307,), (0.3081,))}[name]
  return Dataset(name, splits["train"], splits["test"], 10, *stats)


def _check_labels(labels: np.ndarray, num_classes: int, where: str) -> None:
  if labels.size and int(labels.max()) >= num_classes:
    raise ValueError(f"{where}: label {int(labels.max())} outside [0, {num_classes - 1}].")


# --- CIFAR binary version -------------------------------------------------------------


_CIFAR = {
  "cifar10": (
    10,
    1,
    [f"data_batch_{i}.bin" for i in range(1, 6)],
    ["test_batch.bin"],
    ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
  ),
  "cifar100": (
    100,
    2,
    ["train.bin"],
    ["test.bin"],
    ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
  ),
}


def _cifar_records(raw: bytes, label_bytes: int, num_classes: int, where: str) -> Split:
  rec = label_bytes + 3072
  if len(raw) == 0 or len(raw) % rec:
    raise ValueError(f"{where}: {len(raw)} bytes is not a whole number of {rec}-byte records.")
  a = np.frombuffer(raw, np.uint8).reshape(-1, rec)
  labels = a[:, label_bytes - 1].astype(np.int32)  # CIFAR-100: (coarse, fine); keep fine
  _check_labels(labels, num_classes, where)
  images = a[:, label_bytes:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  return Split(np.ascontiguousarray(images), labels)


def load_cifar(name: str, path: str) -> Dataset:
  """CIFAR-10/100 binary version from its folder or its `.tar.gz`."""
  num_classes, label_bytes, train_files, test_files, stats = _CIFAR[name]
  if os.path.isdir(path):
    sub = [os.path.join(path, d) for d in ("", "cifar-10-batches-bin", "cifar-100-binary")]
    root = next((d for d in sub if os.path.exists(os.path.join(d, test_files[0]))), None)
    if root is None:
      raise ValueError(f"data: {path} holds no {test_files[0]} (CIFAR binary version).")

    def read(f):
      with open(os.path.join(root, f), "rb") as fh:
        return fh.read()
  else:
    try:
      tar = tarfile.open(path)
      members = {os.path.basename(m.name): m for m in tar.getmembers() if m.isfile()}
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
      raise ValueError(f"data: {path} is not a readable tarball ({e}).") from None

    def read(f):
      if f not in members:
        raise ValueError(f"data: {path} has no {f}.")
      try:
        return tar.extractfile(members[f]).read()
      except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise ValueError(f"data: {path}: {f} is truncated or corrupt ({e}).") from None

  def split(files):
    parts = [_cifar_records(read(f), label_bytes, num_classes, f"{path}/{f}") for f in files]
    return Split(
      np.concatenate([p.images for p in parts]), np.concatenate([p.labels for p in parts])
    )

  train, test = split(train_files), split(test_files)
  if (len(train.labels), len(test.labels)) != (50000, 10000):
    raise ValueError(
      f"data: {path}: {len(train.labels)}/{len(test.labels)} images; expected 50000/10000."
    )
  return Dataset(name, train, test, num_classes, *stats)


# --- tfds -------------------------------------------------------------------------------


def _tfds_source(name: str, split: str, data_dir: str | None):
  try:
    import tensorflow_datasets as tfds  # lazy: optional at runtime
  except ImportError as e:
    raise ValueError(f"data: tfds:{name} needs tensorflow-datasets ({e}).") from None
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except Exception as e:  # tfds raises its own types for missing/unprepared data
    raise ValueError(
      f"data: tfds:{name} ({split}) is not prepared under {data_dir or '~/tensorflow_datasets'}: "
      f"{e}. Prepare it on a machine with TensorFlow: `tfds build {name}`."
    ) from None


def _source_info(src, name: str) -> tuple[int, int]:
  """`(num_classes, channels)` from a tfds source's features, checked."""
  feats = src.dataset_info.features
  if "image" not in feats or "label" not in feats:
    raise ValueError(f"data: tfds:{name} has no `image` and `label` features ({list(feats)}).")
  return int(feats["label"].num_classes), int(feats["image"].shape[-1])


def _record(src, i: int, where: str, num_classes: int, channels: int):
  """Example `i` of a tfds source as `(image (h, w, c) uint8, label)`, validated."""
  try:
    item = src[int(i)]
  except Exception as e:  # a corrupt or truncated record file: tfds/array_record errors
    raise ValueError(f"{where}[{i}]: unreadable record ({type(e).__name__}: {e}).") from None
  image, label = np.asarray(item["image"]), int(item["label"])
  if image.ndim != 3 or image.shape[-1] != channels or image.dtype != np.uint8 or not image.size:
    raise ValueError(
      f"{where}[{i}]: image {image.shape} {image.dtype}; expected (h, w, {channels}) uint8."
    )
  if not 0 <= label < num_classes:
    raise ValueError(f"{where}[{i}]: label {label} outside [0, {num_classes - 1}].")
  return image, label


def _channel_stats(images: np.ndarray) -> tuple[tuple, tuple]:
  """Per-channel mean and std of uint8 `images` `(N, H, W, C)`, on the [0, 1] scale."""
  x = images.astype(np.float64) / 255
  return tuple(x.mean(axis=(0, 1, 2))), tuple(x.std(axis=(0, 1, 2)))


def load_tfds(name: str, data_dir: str | None = None, eval_split: str = "test") -> Dataset:
  """A prepared tfds dataset of same-size images (`image`, `label` features), in memory,
  via `tfds.data_source` (no TensorFlow needed to read; preparing it needs TensorFlow)."""
  splits = {}
  for key, split in (("train", "train"), ("test", eval_split)):
    src = _tfds_source(name, split, data_dir)
    num_classes, channels = _source_info(src, name)
    where = f"tfds:{name}/{split}"
    items = [_record(src, i, where, num_classes, channels) for i in range(len(src))]
    shapes = {im.shape for im, _ in items}
    if len(shapes) > 1:
      raise ValueError(
        f"{where}: images of {len(shapes)} sizes; give image_size= to stream and resize them."
      )
    splits[key] = Split(
      np.stack([im for im, _ in items]), np.asarray([lab for _, lab in items], np.int32)
    )
  mean, std = _channel_stats(splits["train"].images[:10000])
  return Dataset(name, splits["train"], splits["test"], num_classes, mean, std)


class Streamed:
  """A split of a random-access source (a tfds data source), read when a batch asks.

  Each record is decoded by tfds and brought to `size x size` on the host (PIL,
  bilinear, one resize from a box of the decoded image): with an `aug_seed`, a random
  crop covering 8-100% of the area with aspect ratio in [3/4, 4/3] (Szegedy et al. 2015,
  the ImageNet training crop; the central crop if 10 draws do not fit), drawn from
  `(aug_seed, example index)` so that it does not depend on which rows a process
  reads (`area`, `aspect` set the ranges); without, the central square of `crop`
  (0.875) of the shorter side, the "resize to 256, crop 224" of evaluation. Records are
  read by `workers` threads (tfds decoding and PIL resizing release the GIL). A bad
  record is a `ValueError` naming it.
  """

  def __init__(
    self,
    source,
    *,
    where: str,
    size: int,
    num_classes: int,
    channels: int,
    crop: float = 0.875,
    area: tuple = (0.08, 1.0),
    aspect: tuple = (3 / 4, 4 / 3),
    workers: int | None = None,
  ):
    if size < 1:
      raise ValueError(f"image_size must be >= 1, got {size}.")
    if not 0 < crop <= 1:
      raise ValueError(f"crop must be in (0, 1], got {crop}.")
    if not 0 < area[0] <= area[1] <= 1:
      raise ValueError(f"area must be (lo, hi) with 0 < lo <= hi <= 1, got {area}.")
    if not 0 < aspect[0] <= aspect[1]:
      raise ValueError(f"aspect must be (lo, hi) with 0 < lo <= hi, got {aspect}.")
    self.source, self.where, self.size, self.crop = source, where, size, crop
    self.area, self.aspect = area, aspect
    self.num_classes, self.channels = num_classes, channels
    self.workers = workers or min(32, os.cpu_count() or 1)
    self._pool = None

  @property
  def num_examples(self) -> int:
    return len(self.source)

  @property
  def image_shape(self) -> tuple:
    return (self.size, self.size, self.channels)

  def _box(self, h: int, w: int, i: int, aug_seed) -> tuple:
    """The `(left, upper, right, lower)` box of example `i` to resize from."""
    if aug_seed is not None:
      rng = np.random.default_rng([*aug_seed, i])
      for _ in range(10):
        area = h * w * rng.uniform(*self.area)
        aspect = math.exp(rng.uniform(math.log(self.aspect[0]), math.log(self.aspect[1])))
        cw, ch = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < cw <= w and 0 < ch <= h:
          x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
          return (x0, y0, x0 + cw, y0 + ch)
      side = min(h, w)
    else:
      side = max(1, round(self.crop * min(h, w)))
    x0, y0 = (w - side) // 2, (h - side) // 2
    return (x0, y0, x0 + side, y0 + side)

  def _one(self, i: int, aug_seed) -> tuple[np.ndarray, int]:
    from PIL import Image  # matplotlib's dependency; imported where images are resized

    image, label = _record(self.source, i, self.where, self.num_classes, self.channels)
    h, w = image.shape[:2]
    pil = Image.fromarray(image[..., 0] if self.channels == 1 else image)
    out = pil.resize(
      (self.size, self.size), Image.Resampling.BILINEAR, box=self._box(h, w, i, aug_seed)
    )
    return np.asarray(out, np.uint8).reshape(self.image_shape), label

  def take(self, idx, aug_seed=None) -> tuple[np.ndarray, np.ndarray]:
    """Rows `idx` (an index array or a slice), cropped for training if `aug_seed`."""
    rows = np.arange(self.num_examples)[idx]
    if self.workers > 1 and len(rows) > 1:
      if self._pool is None:  # made once, on first use; its threads idle between batches
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="tensorial-read")
      got = list(self._pool.map(lambda i: self._one(int(i), aug_seed), rows))
    else:
      got = [self._one(int(i), aug_seed) for i in rows]
    images = np.stack([g[0] for g in got]) if got else np.zeros((0, *self.image_shape), np.uint8)
    return images, np.asarray([g[1] for g in got], np.int32)


def stream_tfds(
  name: str,
  data_dir: str | None = None,
  *,
  image_size: int,
  eval_split: str = "test",
  stats_examples: int = 1000,
  workers: int | None = None,
) -> Dataset:
  """A prepared tfds dataset as two `Streamed` splits of `image_size` square images.

  Mean and std per channel are estimated from the first `stats_examples` training
  images (central crops)."""
  splits = {}
  for key, split in (("train", "train"), ("test", eval_split)):
    src = _tfds_source(name, split, data_dir)
    num_classes, channels = _source_info(src, name)
    splits[key] = Streamed(
      src,
      where=f"tfds:{name}/{split}",
      size=image_size,
      num_classes=num_classes,
      channels=channels,
      workers=workers,
    )
  x, _ = splits["train"].take(slice(0, stats_examples))
  mean, std = _channel_stats(x)
  return Dataset(name, splits["train"], splits["test"], num_classes, mean, std)


def load(
  name: str, data_dir: str | None = None, *, image_size: int = 0, eval_split: str = "test"
) -> Dataset:
  """`fashion_mnist`, `mnist`, `cifar10`, `cifar100` (binary; `data_dir` is the folder or
  tarball), or `tfds:<name>`: in memory, or with `image_size > 0` streamed and resized
  to `image_size` square (`Streamed`; ImageNet). `eval_split` names the tfds split
  evaluated (ImageNet: `validation`)."""
  if name.startswith("tfds:"):
    if image_size:
      return stream_tfds(name[5:], data_dir, image_size=image_size, eval_split=eval_split)
    return load_tfds(name[5:], data_dir, eval_split)
  if image_size:
    raise ValueError(f"data: image_size={image_size} is for tfds:<name> data sets; got {name!r}.")
  if name in ("fashion_mnist", "mnist"):
    return load_idx(name, data_dir)
  if name == "synthetic":  # the tests' toy data set, through the CLI too
    return synthetic()
  if name in _CIFAR:
    if not data_dir:
      raise ValueError(f"data: {name} needs data_dir= (the CIFAR binary folder or tarball).")
    return load_cifar(name, data_dir)
  raise ValueError(
    f"data: unknown dataset {name!r}; allowed fashion_mnist, mnist, cifar10, cifar100, "
    "tfds:<name>, "
    "synthetic."
  )


def synthetic(n_train=512, n_test=256, size=12, num_classes=4, seed=0) -> Dataset:
  """A learnable toy dataset: each class a fixed random pattern plus noise (for tests)."""
  rng = np.random.default_rng(seed)
  protos = rng.uniform(0, 255, (num_classes, size, size, 1))

  def split(n):
    labels = rng.integers(0, num_classes, n).astype(np.int32)
    x = protos[labels] + rng.normal(0, 60, (n, size, size, 1))
    return Split(np.clip(x, 0, 255).astype(np.uint8), labels)

  return Dataset("synthetic", split(n_train), split(n_test), num_classes, (0.5,), (0.3,))


# --- batches ----------------------------------------------------------------------------


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> np.ndarray:
  """Indices of training batch `step`: epoch `step // steps_per_epoch` is a permutation
  seeded by `(seed, epoch)`; the last partial batch of an epoch is dropped."""
  per_epoch = n // batch_size
  if per_epoch < 1:
    raise ValueError(f"batch_size={batch_size} exceeds the {n} training examples.")
  epoch, i = divmod(step, per_epoch)
  perm = np.random.default_rng([seed, epoch]).permutation(n)
  return perm[i * batch_size : (i + 1) * batch_size]


def normalize(images: jax.Array, mean, std, pad_to: int | None = None) -> jax.Array:
  """uint8 `(N, H, W, C)` -> float32, standardised; zero-padded to `pad_to` square."""
  x = images.astype(jnp.float32) / 255.0
  x = (x - jnp.asarray(mean, jnp.float32)[None, None, None]) / jnp.asarray(std, jnp.float32)[
    None, None, None
  ]
  if pad_to is not None and x.shape[1] < pad_to:
    lo = (pad_to - x.shape[1]) // 2
    hi = pad_to - x.shape[1] - lo
    x = jnp.pad(x, ((0, 0), (lo, hi), (lo, hi), (0, 0)))
  return x


def augment(key: jax.Array, x: jax.Array, *, crop_pad: int = 4, flip: bool = True) -> jax.Array:
  """On-device pad-and-crop (`crop_pad` pixels of zero padding) and horizontal flip."""
  n, h, w, _ = x.shape
  k1, k2 = jax.random.split(key)
  if crop_pad:
    xp = jnp.pad(x, ((0, 0), (crop_pad, crop_pad), (crop_pad, crop_pad), (0, 0)))
    offs = jax.random.randint(k1, (n, 2), 0, 2 * crop_pad + 1)
    # The crop as two batched one-hot products (exact at HIGHEST precision): a batch dot
    # shards with the batch, where a gather's output sharding is ambiguous.
    hp, wp = h + 2 * crop_pad, w + 2 * crop_pad
    r = jax.nn.one_hot(offs[:, :1] + jnp.arange(h)[None], hp, dtype=x.dtype)  # (n, h, hp)
    c = jax.nn.one_hot(offs[:, 1:] + jnp.arange(w)[None], wp, dtype=x.dtype)  # (n, w, wp)
    hi = jax.lax.Precision.HIGHEST
    x = jnp.einsum("nip,npqc->niqc", r, xp, precision=hi)
    x = jnp.einsum("njq,niqc->nijc", c, x, precision=hi)
  if flip:
    do = jax.random.bernoulli(k2, 0.5, (n,))
    x = jnp.where(do[:, None, None, None], x[:, :, ::-1, :], x)
  return x
