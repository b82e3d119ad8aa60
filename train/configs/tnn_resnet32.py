r"""TNN (Su et al., "Tensorial Neural Networks", 2022): ResNet-32 compressed to a fraction of
its residual conv weights with a reshaped tensorial layer, trained by sequential (Seq-KD)
and end-to-end (E2E-KD) distillation from the dense net, and by plain fine-tuning.

  python -m train --config train/configs/tnn_resnet32.py:0.1,mtt --workdir DIR \
      --config.data_dir=/path/to/cifar-10-binary.tar.gz
  python -m train --config train/configs/tnn_resnet32.py:0.05,mcp,fmnist --workdir DIR

ARG: the fraction (0.05, 0.1 or 0.2 in the paper; default 0.1), the layer (cp, tucker2,
tt, tr, mcp, mtk, mtt, mtr; default mtt), optionally `fmnist`. Hardware: one GPU.
Expected: not yet measured with this config. The m-forms run their spatial conv once per
output channel (many MACs at equal size); use a GPU.
"""

from train.configs import common
from train.configs.common import epochs, opt, section

LAYERS = ("cp", "tucker2", "tt", "tr", "mcp", "mtk", "mtt", "mtr")


def get_config(arg=None):
  t = common.tokens(arg)
  ratio = float(next((x for x in t if x[0].isdigit()), 0.1))
  layer = next((x for x in t if x in LAYERS), "mtt")
  c = common.base("cifar10", "resnet32")
  if "fmnist" in t:
    common.to_fashion(c)
  c.methods = ("dense", "seqkd", "e2ekd", "finetune")
  c.dense = section(steps=epochs(c, 160), opt=opt(0.1, wd=1e-4))
  kd = dict(method=layer, ratio=ratio, alpha=0.9, temperature=4.0, opt=opt(0.02, wd=1e-4))
  c.seqkd = section(block_steps=epochs(c, 2), e2e_steps=epochs(c, 60), **kd)
  c.e2ekd = section(steps=epochs(c, 90), **kd)
  c.finetune = section(method=layer, ratio=ratio, steps=epochs(c, 90), opt=opt(0.02, wd=1e-4))
  return c
