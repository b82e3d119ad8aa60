r"""DeepTwist on ResNet-32 (Lee et al., "Learning Low-Rank Approximation for CNNs", 2019):
Tucker-2 and tiled SVD, against decomposed-model training at the same ranks.

  python -m train --config train/configs/deeptwist_resnet32.py --workdir DIR \
      --config.data_dir=/path/to/cifar-10-binary.tar.gz
  python -m train --config train/configs/deeptwist_resnet32.py:fmnist --workdir DIR

Hardware: one GPU (the H100 of ../shared/GPU.md) for the CIFAR-10 version; CPU-only runs
are for the Fashion-MNIST version with fewer epochs (`--config.dense.steps=...`).
Expected: not yet measured with this config (the papers report ~92-93% for the dense
ResNet-32 on CIFAR-10). Methods: dense pretraining (160 epochs), then from it DeepTwist
with Tucker-2 and with tiled SVD (each keeping ~25% of the residual 3x3 convs' weights,
SD 200 steps, 80 epochs, BatchNorm recalibrated after the last distortion), and
`finetune_tucker2`: the decomposed Tucker-2 net at the same ranks trained as long (the
paper's "decomposed-model training" baseline).
"""

from train.configs import common
from train.configs.common import epochs, opt, section


def get_config(arg=None):
  t = common.tokens(arg)
  c = common.base("cifar10", "resnet32")
  if "fmnist" in t:
    common.to_fashion(c)
  c.methods = ("dense", "deeptwist_tucker2", "deeptwist_tiled", "finetune_tucker2")
  c.dense = section(steps=epochs(c, 160), opt=opt(0.1, wd=1e-4))
  twist = dict(kind="deeptwist", sd=200, sd_rule="", bn_batches=50, steps=epochs(c, 80))
  c.deeptwist_tucker2 = section(method="tucker2", ratio=0.25, opt=opt(0.02, wd=1e-4), **twist)
  c.deeptwist_tiled = section(
    method="tiled_svd", ratio=0.25, grid=(2, 2), opt=opt(0.02, wd=1e-4), **twist
  )
  c.finetune_tucker2 = section(
    kind="finetune", method="tucker2", ratio=0.25, steps=epochs(c, 80), opt=opt(0.02, wd=1e-4)
  )
  return c
