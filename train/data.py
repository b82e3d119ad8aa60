"""Datasets as validated in-memory arrays, a deterministic batch order, device augmentation.

Readers: IDX `.gz` (MNIST, Fashion-MNIST), the CIFAR-10/100 binary version (folder or
tarball, no pickle), and any prepared tfds dataset (`tensorflow_datasets` imported only
there). Every reader checks magic numbers, sizes, counts and label ranges, so a corrupt or
truncated file is a `ValueError` naming the file, never a half-read dataset.

The batch order is a pure function of `(seed, epoch, index)`: a checkpoint that stores the
step therefore stores the data position, and a resumed run sees the same batches.
"""

from __future__ import annotations

import gzip
import os
import struct
import tarfile
import zlib
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
_IDX_FILES = {
  "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
  "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_EXPECTED = {"train": 60000, "test": 10000}


class Split(NamedTuple):
  """`images (N, H, W, C) uint8`, `labels (N,) int32`."""

  images: np.ndarray
  labels: np.ndarray


class Dataset(NamedTuple):
  name: str
  train: Split
  test: Split
  num_classes: int
  mean: tuple
  std: tuple


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


def load_tfds(name: str, data_dir: str | None = None) -> Dataset:
  """A prepared tfds dataset with `image` and `label` features, via `tfds.data_source`
  (no TensorFlow needed to read; preparing it needs TensorFlow)."""
  try:
    import tensorflow_datasets as tfds  # lazy: optional at runtime
  except ImportError as e:
    raise ValueError(f"data: tfds:{name} needs tensorflow-datasets ({e}).") from None
  splits, info = {}, None
  for split in ("train", "test"):
    try:
      src = tfds.data_source(name, split=split, data_dir=data_dir)
    except Exception as e:  # tfds raises its own types for missing/unprepared data
      raise ValueError(
        f"data: tfds:{name} ({split}) is not prepared under {data_dir or '~/tensorflow_datasets'}: "
        f"{e}. Prepare it on a machine with TensorFlow: `tfds build {name}`."
      ) from None
    info = src.dataset_info
    items = [src[i] for i in range(len(src))]
    splits[split] = Split(
      np.stack([it["image"] for it in items]).astype(np.uint8),
      np.asarray([it["label"] for it in items], np.int32),
    )
  n = info.features["label"].num_classes
  x = splits["train"].images[:10000].astype(np.float64) / 255
  mean = tuple(x.mean(axis=(0, 1, 2)))
  std = tuple(x.std(axis=(0, 1, 2)))
  return Dataset(name, splits["train"], splits["test"], n, mean, std)


def load(name: str, data_dir: str | None = None) -> Dataset:
  """`fashion_mnist`, `mnist`, `cifar10`, `cifar100` (binary; `data_dir` is the folder or
  tarball), or `tfds:<name>`."""
  if name in ("fashion_mnist", "mnist"):
    return load_idx(name, data_dir)
  if name in _CIFAR:
    if not data_dir:
      raise ValueError(f"data: {name} needs data_dir= (the CIFAR binary folder or tarball).")
    return load_cifar(name, data_dir)
  if name.startswith("tfds:"):
    return load_tfds(name[5:], data_dir)
  raise ValueError(
    f"data: unknown dataset {name!r}; allowed fashion_mnist, mnist, cifar10, cifar100, tfds:<name>."
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
