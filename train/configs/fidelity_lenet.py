r"""Fidelity study, small net: TNN's table on LeNet-5, from the kept Fashion-MNIST teacher.

  python -m train --config train/configs/fidelity_lenet.py:RATE --workdir DIR --config.seed=S
  bash benchmarks/fidelity.sh lenet           # rates 0.05, 0.1, 0.2, 3 seeds each

The claims tested (Su et al. 2022, as `PAPERS.md` reads the authors' code): at an equal
rate (the fraction of the compressed layers' parameters kept), the reshaped "m" forms
beat the plain forms; Seq-KD beats E2E-KD at the lowest rate; Seq-KD beats training the
same TNN from scratch. From `teachers/lenet5_fmnist.npz` (test 0.9103). Compressed: the
5x5 conv of LeNet's block (6 -> 16) and the two hidden dense layers (400 -> 120 -> 84);
the first conv and the classifier stay dense. Arms at RATE:

- `seqkd_{cp,tucker2,tt}`: the plain forms on the conv (CP, Tucker-2, TT), the dense layers
  as rank-r matrices (`svd`: the plain form of a 2-way weight);
- `seqkd_{mcp,mtk,mtt}`: the m-forms on both (channels factored as the authors' PyTorch
  code does, `tnn.make_plan`'s default modes);
- at RATE 0.05 also `e2ekd_mcp` (end-to-end distillation on logits) and `scratch_mcp` (the
  same mCP net from random factors, cross-entropy), for the other two claims.

Seq-KD as the authors run it: MSE to the teacher's block output, Adam at 1e-3, only that
block trains; LeNet has one block, and its compressed dense layers are outside it, so
Seq-KD is followed by end-to-end distillation (alpha 0.9, T 4). Every arm trains for the
same 4 epochs in all (Seq-KD: 1 block epoch + 3 end-to-end; the others 4), Adam 1e-3,
batch 128, no augmentation. The m-form arms' layers train through their reconstructed
weights (`forward="reconstructed"`: the same function and gradients; XLA's CPU backend runs
the factorized m-form pipeline several times slower, the README's m-form measurement);
their rows' MACs are the factorized forward's. Departures, for the CPU: Fashion-MNIST
instead of MNIST, 4 epochs instead of 100 per stage, and the E2E phase LeNet's layout
forces.
"""

import json
import os

from train.configs import common
from train.configs.common import epochs, section

TEACHER = os.path.join(
  os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
  "teachers",
  "lenet5_fmnist.npz",
)
RATES = ("0.05", "0.1", "0.2")
HIDDEN = ("head.layers.0", "head.layers.1")


def get_config(arg=None):
  t = common.tokens(arg)
  rate = next((x for x in t if x[0].isdigit()), "0.1")
  if rate not in RATES:
    raise ValueError(f"config arg: rate {rate!r}; allowed {RATES}.")
  r = float(rate)
  n_ep = float(next((x[7:] for x in t if x.startswith("epochs=")), 4))
  c = common.base("fashion_mnist", "lenet5")
  c.augment = section(crop_pad=0, flip=False)
  c.init_from = TEACHER
  c.dense = section(steps=0, opt=common.opt(0.05))
  adam = dict(optimizer="adam", lr=1e-3, schedule="constant", weight_decay=0.0, momentum=0.9)
  total = epochs(c, n_ep)
  block = max(total // 4, 1)
  kd = dict(alpha=0.9, temperature=4.0, opt=adam)
  layers = ("blocks.*", *HIDDEN)
  methods = ["dense"]
  for form in ("cp", "tucker2", "tt"):
    over = json.dumps({p: {"method": "svd", "ratio": r} for p in HIDDEN})
    c[f"seqkd_{form}"] = section(
      kind="seqkd", method=form, ratio=r, layers=layers, overrides=over,
      block_steps=block, e2e_steps=total - block, **kd,
    )  # fmt: skip
    methods.append(f"seqkd_{form}")
  for form in ("mcp", "mtk", "mtt"):
    c[f"seqkd_{form}"] = section(
      kind="seqkd", method=form, ratio=r, layers=layers, forward="reconstructed",
      block_steps=block, e2e_steps=total - block, **kd,
    )  # fmt: skip
    methods.append(f"seqkd_{form}")
  if rate == RATES[0]:
    m_form = dict(method="mcp", ratio=r, layers=layers, steps=total, forward="reconstructed")
    c.e2ekd_mcp = section(kind="e2ekd", **m_form, **kd)
    c.scratch_mcp = section(kind="scratch", **m_form, opt=adam)
    methods += ["e2ekd_mcp", "scratch_mcp"]
  c.methods = tuple(methods)
  c.checkpoint_every, c.log_every = 500, 100
  return c
