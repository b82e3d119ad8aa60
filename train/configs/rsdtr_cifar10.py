r"""RSDTR (Gabor & Zdunek): TR-SVD of every residual 3x3 kernel at relative error `eps`,
the storage-minimal circular shift kept, the 4-sublayer TR net fine-tuned.

  python -m train --config train/configs/rsdtr_cifar10.py:resnet32 --workdir DIR \
      --config.data_dir=/path/to/cifar-10-binary.tar.gz
  python -m train --config train/configs/rsdtr_cifar10.py:resnet20,fmnist --workdir DIR

ARG: one of resnet20, resnet32, resnet56 (default resnet32), optionally `fmnist`, and
optionally `eps=<float>` (default 0.3). Hardware: one GPU for CIFAR-10. Expected: not yet
measured with this config. The eps plan is the RSDTR search on the trained dense weights
(one compile per distinct kernel shape; ~30-60 s each on a 2-core CPU).
"""

from train.configs import common
from train.configs.common import epochs, opt, section


def get_config(arg=None):
  t = common.tokens(arg)
  model = next((x for x in t if x.startswith("resnet")), "resnet32")
  if model not in ("resnet20", "resnet32", "resnet56"):
    raise ValueError(f"config arg: model {model!r}; allowed resnet20, resnet32, resnet56.")
  eps = float(next((x[4:] for x in t if x.startswith("eps=")), 0.3))
  c = common.base("cifar10", model)
  if "fmnist" in t:
    common.to_fashion(c)
  c.methods = ("dense", "finetune")
  c.dense = section(steps=epochs(c, 160), opt=opt(0.1, wd=1e-4))
  c.finetune = section(method="tr", eps=eps, steps=epochs(c, 40), opt=opt(0.01, wd=1e-4))
  return c
