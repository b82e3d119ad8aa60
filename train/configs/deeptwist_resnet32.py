r"""DeepTwist (Lee et al. 2019, "Learning low-rank approximation for CNNs", arXiv:1905.10145)
on ResNet-32 / CIFAR-10, as the paper's text describes its experiments (no public code).

  python -m train --config train/configs/deeptwist_resnet32.py --workdir DIR \
      --config.data_dir=/path/to/cifar-10-binary.tar.gz
  python -m train --config train/configs/deeptwist_resnet32.py:fmnist --workdir DIR

Hardware: one GPU. From one pretrained dense ResNet-32 (160 epochs, SGD lr 0.1 cosine,
weight decay 1e-4; the paper starts from a pretrained net and does not say how it was
trained):

- `deeptwist_tucker2` against `tucker2`: Tucker-2 (1x1, 3x3, 1x1) on every residual 3x3
  conv at 25% of its weights; DeepTwist with SD = 200 against training the decomposed
  model, the same schedule (80 epochs, SGD lr 0.02 cosine; ours: the paper gives no
  length);
- `tiled_1x1` / `tiled_2x2` / `tiled_4x4`: tiled SVD of the nine 64 -> 64 convs of the
  last stage, each lowered to a 64 x (64*3*3) matrix, tiled in 1, 4 and 16 blocks at the
  same ratio (25% of those weights), DeepTwist with SD = 200 on the same schedule. Integer
  ranks keep 24.3%, 24.3% and 20.8% (ranks 14, 7, 3 per tile); 8x8 tiles would keep
  13.9% (rank 1), too far from equal, so it is left out. 1x1 is the plain 2D SVD of the
  lowered matrix.

BatchNorm statistics are recomputed after the last distortion (ours; the paper does not
say). Expected: not yet measured with this config (no CIFAR here; the papers report ~92-93%
for the dense ResNet-32).
"""

from train.configs import common
from train.configs.common import epochs, opt, section

# The nine 64 -> 64 convs of ResNet-32's last stage (its first conv is 32 -> 64).
LAST_STAGE_64 = ("blocks.2.layers.0.conv2", "blocks.2.layers.[1-4].conv*")
GRIDS = ((1, 1), (2, 2), (4, 4))


def get_config(arg=None):
  t = common.tokens(arg)
  c = common.base("cifar10", "resnet32")
  if "fmnist" in t:
    common.to_fashion(c)
  c.dense = section(steps=epochs(c, 160), opt=opt(0.1, wd=1e-4))
  n = epochs(c, 80)
  n = 200 * -(-n // 200)  # a multiple of SD: the last step is a distortion
  twist = dict(kind="deeptwist", sd=200, sd_rule="", bn_batches=50, steps=n)
  c.deeptwist_tucker2 = section(method="tucker2", ratio=0.25, opt=opt(0.02, wd=1e-4), **twist)
  c.tucker2 = section(
    kind="finetune", method="tucker2", ratio=0.25, steps=n, opt=opt(0.02, wd=1e-4)
  )
  methods = ["dense", "deeptwist_tucker2", "tucker2"]
  for g in GRIDS:
    name = f"tiled_{g[0]}x{g[1]}"
    c[name] = section(
      method="tiled_svd",
      ratio=0.25,
      grid=g,
      layers=LAST_STAGE_64,
      opt=opt(0.02, wd=1e-4),
      **twist,
    )
    methods.append(name)
  c.methods = tuple(methods)
  return c
