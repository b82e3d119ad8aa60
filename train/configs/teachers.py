r"""The dense Fashion-MNIST teachers kept in `teachers/`: every compression run of the
fidelity study and the demo starts from one of them (`--config.init_from=teachers/NAME.npz`).

  python -m train --config train/configs/teachers.py:resnet20 --workdir DIR
  python -m train --config train/configs/teachers.py:cnn --workdir DIR
  python -m train --config train/configs/teachers.py:lenet5 --workdir DIR
  python -m train.export_teacher --workdir DIR --out teachers/NAME.npz   # export the dense phase

ARG: the net. Hardware: the 2-core x86_64 CPU of this project (no GPU); the longest
schedule that fit a session there (the README's teacher table gives the command, date,
wall time and test accuracy of each kept file).

- `resnet20`: the CIFAR ResNet-20 (option-A shortcuts), Fashion-MNIST padded to 32x32,
  random crops (pad 2), no flip; SGD (Nesterov, momentum 0.9) lr 0.1 cosine, weight decay
  5e-4, batch 128, 15 epochs. The RSDTR authors' CIFAR baseline is 200 epochs and TNN's
  250; 15 is what a 2-core CPU trains in about an hour and a half.
- `cnn`: the demo CNN (widths 16/32/64), 28x28, crops (pad 2); lr 0.05 cosine, 12 epochs.
- `lenet5`: LeNet-5 (TNN's small net), 28x28, crops (pad 2); lr 0.05 cosine, 20 epochs
  (the epoch count of `tnn_lenet5.py`'s dense phase).
"""

from train.configs import common
from train.configs.common import epochs, opt, section

NETS = ("resnet20", "cnn", "lenet5")


def get_config(arg=None):
  t = common.tokens(arg)
  net = t[0] if t else "resnet20"
  if net not in NETS:
    raise ValueError(f"config arg: net {net!r}; allowed {NETS}.")
  if net == "resnet20":
    c = common.to_fashion(common.base("cifar10", "resnet20"))
    c.dense = section(steps=epochs(c, 15), opt=opt(0.1, wd=5e-4))
  else:
    c = common.base("fashion_mnist", net)
    c.augment = section(crop_pad=2, flip=False)
    if net == "cnn":
      c.model_kwargs = section(widths=(16, 32, 64))
    n_ep = 12 if net == "cnn" else 20
    c.dense = section(steps=epochs(c, n_ep), opt=opt(0.05, wd=5e-4))
  c.methods = ("dense",)
  c.checkpoint_every = 500
  c.log_every = 100
  return c
