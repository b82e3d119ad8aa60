r"""TNN (Su et al., Front. AI 2022; arXiv:1805.10352) on ResNet-32 / CIFAR-10, as the authors'
code runs the compression experiments (`FurongHuang/TTP-NeuralNets-Compression`, commit
19b4333, and the PyTorch code `umd-huang-lab/Tensorial-Neural-Networks`, commit ab972d6).

  python -m train --config train/configs/tnn_resnet32.py:0.1,mcp --workdir DIR \
      --config.data_dir=/path/to/cifar-10-binary.tar.gz
  python -m train --config train/configs/tnn_resnet32.py:0.05,mtt,fmnist --workdir DIR

ARG: the rate (the fraction of the compressed layers' parameters kept; 0.05, 0.1 or 0.2;
default 0.1), the layer (cp, tucker2, tt, tr, mcp, mtk, mtt, mtr; default mcp), optionally
`fmnist`. Hardware: one GPU (the m-forms run many more MACs than their size suggests).

The recipe:
- pretrained baseline: SGD lr 0.1, momentum 0.9, weight decay 2e-4, batch 128, 250
  epochs, lr x0.1 at epochs 100, 150 and 200;
- layer-wise decomposition of every residual 3x3 conv initialises the compressed net;
- `seqkd`: one block = one ResNet stage (the stem, which stays dense, goes with stage 0);
  loss = MSE between the student's and the teacher's stage outputs from the teacher's
  stage input; only that stage trains; Adam at 1e-3; 100 epochs per stage (the README's
  CIFAR example); no end-to-end phase afterwards (the paper's results were obtained
  without it, says the authors' CIFAR script);
- `e2ekd` (end-to-end distillation on logits, alpha 0.9, T 4) and `scratch` (the same TNN
  from random factors, cross-entropy) are separate methods, each with Adam at 1e-3 for as
  many steps as Seq-KD takes in all (our choice: the same budget);
- m-forms factor every channel count into 3 modes (64 -> 4x4x4), as the PyTorch code
  does (the TF code uses 2 for rCP/rTK and 3 for rTT).

Expected (the paper's table, CIFAR-10, dense 93.2%): TNN-mCP 85.7 / 89.86 / 91.28 at
the three rates, low to high. Not yet measured with this config (no CIFAR here).
"""

from train.configs import common
from train.configs.common import epochs, opt, section

LAYERS = ("cp", "tucker2", "tt", "tr", "mcp", "mtk", "mtt", "mtr")
ADAM = dict(optimizer="adam", lr=1e-3, schedule="constant", weight_decay=0.0, momentum=0.9)


def get_config(arg=None):
  t = common.tokens(arg)
  ratio = float(next((x for x in t if x[0].isdigit()), 0.1))
  layer = next((x for x in t if x in LAYERS), "mcp")
  c = common.base("cifar10", "resnet32")
  if "fmnist" in t:
    common.to_fashion(c)
  c.methods = ("dense", "seqkd", "e2ekd", "scratch")
  base_opt = opt(0.1, wd=2e-4, schedule="step")
  base_opt.boundaries, base_opt.nesterov = (0.4, 0.6, 0.8), False
  c.dense = section(steps=epochs(c, 250), opt=base_opt)
  form = dict(method=layer, ratio=ratio)
  if layer.startswith("m"):
    form["modes"] = 3
  per_stage = epochs(c, 100)
  c.seqkd = section(block_steps=per_stage, e2e_steps=0, opt=dict(ADAM), **form)
  kd = dict(alpha=0.9, temperature=4.0)
  c.e2ekd = section(steps=3 * per_stage, opt=dict(ADAM), **kd, **form)
  c.scratch = section(steps=3 * per_stage, opt=dict(ADAM), **form)
  return c
