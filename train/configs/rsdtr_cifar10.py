r"""RSDTR (Gabor & Zdunek 2024, arXiv:2405.10802) on the CIFAR ResNets, as the authors' code
runs it (`mateuszgabor/rsdtr_compression`, commit cdb5ecf: `cifar.py`, `rsdtr.py`).

  python -m train --config train/configs/rsdtr_cifar10.py:resnet20 --workdir DIR \
      --config.data_dir=/path/to/cifar-10-binary.tar.gz
  python -m train --config train/configs/rsdtr_cifar10.py:resnet20 --workdir DIR \
      --config.data_dir=... --config.init_from=resnet20.pth --config.dense.steps=0
  python -m train --config train/configs/rsdtr_cifar10.py:resnet20,fmnist --workdir DIR

ARG: resnet20, resnet32 or resnet56 (default resnet32), optionally `eps=<float>` (default
0.5, the authors' CIFAR ResNet-20 example) and `fmnist`. Hardware: one GPU.

The recipe:
- decomposed: `conv1` and `conv2` of every residual block (the papers' default layers of
  `tnn.make_plan`); stem, shortcuts and classifier stay dense;
- the search: TR-SVD at eps for every circular shift and every split of the first rank,
  the smallest storage kept (`decomp.rsdtr`; its storage equals the authors' loop);
- dense baseline: SGD lr 0.1, momentum 0.9 (not Nesterov), weight decay 1e-4, batch 128,
  200 epochs, lr x0.1 at epochs 100 and 150;
- fine-tuning: SGD under PyTorch's `OneCycleLR` (max lr 0.01, 160 epochs, batch 128), whose
  default `cycle_momentum` replaces the optimizer's momentum by a 0.95 -> 0.85 -> 0.95
  cycle (so the README example's momentum 0 has no effect, as we read torch), weight decay
  1e-4 (`cifar.py`'s default); random crops (pad 4) and flips.
- `--config.init_from=FILE.pth` starts from the authors' checkpoint of the dense net
  (`tnn.weights.from_cifar_resnet`; their `{"model", "state_dict"}` file is unwrapped).

Departures: normalisation by the data set's own mean/std (the authors use ImageNet's);
their MultiStep milestones are stepped per batch (as iterations, a likely bug), ours are
the epochs the text means; their fine-tuning keeps the best test-epoch model, we report
the last. Expected: not yet measured with this config (no CIFAR here).
"""

from train.configs import common
from train.configs.common import epochs, opt, section


def get_config(arg=None):
  t = common.tokens(arg)
  model = next((x for x in t if x.startswith("resnet")), "resnet32")
  if model not in ("resnet20", "resnet32", "resnet56"):
    raise ValueError(f"config arg: model {model!r}; allowed resnet20, resnet32, resnet56.")
  eps = float(next((x[4:] for x in t if x.startswith("eps=")), 0.5))
  c = common.base("cifar10", model)
  if "fmnist" in t:
    common.to_fashion(c)
  c.methods = ("dense", "finetune")
  dense_opt = opt(0.1, wd=1e-4, schedule="step")
  dense_opt.nesterov = False
  c.dense = section(steps=epochs(c, 200), opt=dense_opt)
  ft = opt(0.01, wd=1e-4, schedule="onecycle")
  ft.nesterov, ft.cycle_momentum = False, (0.85, 0.95)
  c.finetune = section(method="tr", eps=eps, steps=epochs(c, 160), opt=ft)
  return c
