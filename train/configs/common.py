"""Shared pieces of the experiment configs: data sets, optimizers, method sections.

Every paper config takes an argument after its file name (`--config file.py:ARG`), a
comma-separated list of tokens; the token `fmnist` turns it into its Fashion-MNIST
version (1 channel, padded to 32x32 so the CIFAR architectures apply unchanged, no flip),
which runs where CIFAR/ImageNet do not. Step counts are written in epochs of the data set
actually used (`epochs(n)`), so the Fashion-MNIST versions train as long, in epochs, as
the originals.

The hyper-parameters are ours unless a docstring says it took them from a paper: the
papers' texts were not at hand when these were written, so treat them as starting points.
"""

from __future__ import annotations

import math

import ml_collections

# training-set sizes (images) per data set, for epoch <-> step conversion
TRAIN_SIZE = {
  "cifar10": 50000,
  "cifar100": 50000,
  "fashion_mnist": 60000,
  "mnist": 60000,
  "tfds:imagenet2012": 1281167,
}


def tokens(arg: str | None) -> list[str]:
  return [t.strip() for t in (arg or "").split(",") if t.strip()]


def opt(lr: float, wd: float = 5e-4, schedule: str = "cosine", momentum: float = 0.9):
  return ml_collections.ConfigDict(
    dict(lr=lr, momentum=momentum, weight_decay=wd, schedule=schedule, optimizer="sgd")
  )


def base(dataset: str, model: str, *, batch_size: int = 128) -> ml_collections.ConfigDict:
  """Data, model and run settings; CIFAR-style augmentation (pad 4 and crop, flip)."""
  c = ml_collections.ConfigDict()
  c.dataset = dataset
  c.data_dir = ""  # CIFAR: the binary folder or tarball; Fashion-MNIST: Debian's folder
  c.image_size = 0  # > 0: stream a tfds data set, images cropped to this square on the host
  c.eval_split = "test"  # the tfds split evaluated (ImageNet: validation)
  c.model = model
  c.model_kwargs = ml_collections.ConfigDict()
  c.pad_to = 0
  c.augment = ml_collections.ConfigDict(dict(crop_pad=4, flip=True))
  c.label_smoothing = 0.0
  c.compute_dtype = "float32"
  # Convolutions where the program runs on the CPU: "onednn" (tnn.onednn: 2-5x XLA's on
  # the ResNet shapes), "xla", or "auto" (oneDNN where its plugin loads, else XLA's; the
  # run prints which). On a GPU or TPU all mean XLA's own.
  c.cpu_conv = "auto"
  c.batch_size = batch_size
  c.seed = 0
  c.init_from = ""  # a weights file the dense net starts from (a kept teacher, .npz)
  c.resume = ""  # "force": continue a workdir whose saved phases were made under other settings
  c.checkpoint_every = 1000
  c.keep = 2
  c.log_every = 100
  c.eval_every = 500  # test accuracy on the first `eval_examples` test images (the plots)
  c.eval_examples = 1000
  # The last `validation` training images held out (0: none); `eval_on="validation"`
  # evaluates them instead of the test split (hyper-parameter searches), the test split
  # then never read. Every result row records the split it was evaluated on.
  c.validation = 0
  c.eval_on = "test"
  return c


def to_fashion(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The Fashion-MNIST version of a CIFAR config (same model, padded to 32x32, no flip)."""
  c.dataset = "fashion_mnist"
  c.data_dir = ""
  c.image_size, c.eval_split = 0, "test"
  c.pad_to = 32
  c.augment = ml_collections.ConfigDict(dict(crop_pad=2, flip=False))
  return c


def imagenet(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """ImageNet (ILSVRC 2012) through tfds, streamed: Inception crops to 224 on the host
  and a device flip for training, central crops of `validation` for evaluation."""
  c.dataset = "tfds:imagenet2012"
  c.image_size, c.eval_split = 224, "validation"
  c.pad_to = 0
  c.augment = ml_collections.ConfigDict(dict(crop_pad=0, flip=True))
  return c


def epochs(c: ml_collections.ConfigDict, n: float) -> int:
  """`n` epochs of `c.dataset` in steps of `c.batch_size`."""
  return math.ceil(n * TRAIN_SIZE[c.dataset] / c.batch_size)


def section(**kw) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(kw)
