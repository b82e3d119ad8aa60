r"""TNN on LeNet-5 / MNIST (Su et al. 2022): every conv and the hidden dense layers
compressed with a reshaped tensorial layer; Seq-KD (the authors' recipe: Adam 1e-3, the
block alone, 50 epochs, the code's default), E2E-KD and training from scratch.

  python -m train --config train/configs/tnn_lenet5.py --workdir DIR --config.data_dir=MNIST_DIR
  python -m train --config train/configs/tnn_lenet5.py:fmnist --workdir DIR

ARG: optionally the fraction (default 0.1), the layer (default mcp), `fmnist` (Fashion-MNIST
from Debian's folder instead of MNIST IDX files in data_dir). Hardware: a CPU is enough.
Expected: not yet measured with this config.
"""

from train.configs import common
from train.configs.common import epochs, opt, section


def get_config(arg=None):
  t = common.tokens(arg)
  ratio = float(next((x for x in t if x[0].isdigit()), 0.1))
  layer = next((x for x in t if x in ("mcp", "mtk", "mtt", "mtr", "svd")), "mcp")
  c = common.base("fashion_mnist" if "fmnist" in t else "mnist", "lenet5")
  c.augment = section(crop_pad=0, flip=False)
  c.methods = ("dense", "seqkd", "e2ekd", "scratch")
  c.dense = section(steps=epochs(c, 20), opt=opt(0.05))
  layers = ("blocks.*", "head.*") if layer != "svd" else ("blocks.*",)
  adam = dict(optimizer="adam", lr=1e-3, schedule="constant", weight_decay=0.0, momentum=0.9)
  form = dict(method=layer, ratio=ratio, layers=layers, opt=adam)
  # TNN's Seq-KD: Adam 1e-3, only the block trains, no end-to-end phase (the paper's
  # results); LeNet has one block, so its compressed dense layers keep their decomposed
  # values. E2E-KD and scratch: separate methods, the same budget.
  c.seqkd = section(block_steps=epochs(c, 50), e2e_steps=0, **form)
  c.e2ekd = section(steps=epochs(c, 50), alpha=0.9, temperature=4.0, **form)
  c.scratch = section(steps=epochs(c, 50), **form)
  return c
