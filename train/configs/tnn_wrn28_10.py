r"""TNN on WRN-28-10 / CIFAR-100 (Su et al. 2022): residual 3x3 convs compressed with a
reshaped tensorial layer, Seq-KD then E2E-KD.

  python -m train --config train/configs/tnn_wrn28_10.py:0.05,mtt --workdir DIR \
      --config.data_dir=/path/to/cifar-100-binary.tar.gz

ARG: the fraction (default 0.05), the layer (default mtt), `fmnist` for the Fashion-MNIST
version (10 classes). Hardware: one GPU (36.5M parameters; a CPU is far too slow).
Expected: not yet measured with this config.
"""

from train.configs import common
from train.configs.common import epochs, opt, section


def get_config(arg=None):
  t = common.tokens(arg)
  ratio = float(next((x for x in t if x[0].isdigit()), 0.05))
  layer = next(
    (x for x in t if x in ("cp", "tucker2", "tt", "tr", "mcp", "mtk", "mtt", "mtr")), "mtt"
  )
  c = common.base("cifar100", "wrn28_10")
  if "fmnist" in t:
    common.to_fashion(c)
  c.methods = ("dense", "seqkd", "e2ekd", "scratch")
  c.dense = section(steps=epochs(c, 200), opt=opt(0.1, schedule="step"))
  adam = dict(optimizer="adam", lr=1e-3, schedule="constant", weight_decay=0.0, momentum=0.9)
  form = dict(method=layer, ratio=ratio, opt=adam)
  if layer.startswith("m"):
    form["modes"] = 3
  # TNN's Seq-KD (Adam 1e-3, one stage at a time, 100 epochs per stage, no E2E phase);
  # E2E-KD and scratch as separate methods with the same budget (3 stages).
  c.seqkd = section(block_steps=epochs(c, 100), e2e_steps=0, **form)
  c.e2ekd = section(steps=epochs(c, 300), alpha=0.9, temperature=4.0, **form)
  c.scratch = section(steps=epochs(c, 300), **form)
  return c
