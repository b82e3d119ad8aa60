r"""Fidelity study, ResNet-20: every method at about 10% and 20% of the residual convs'
weights, from the kept Fashion-MNIST teacher, on one schedule length for all.

  python -m train --config train/configs/fidelity_resnet20.py:RATE[,steps=N] --workdir DIR
  PYTHONPATH=. python -m benchmarks.fidelity --study resnet20 --arg RATE --seeds 0

RATE: 0.1 or 0.2, the fraction of each decomposed conv's weights kept (every conv of the
residual blocks; the stem, the option-A shortcuts and the classifier stay dense). From
`teachers/resnet20_fmnist.npz`. Each arm follows its authors' recipe for the optimizer;
the length is one budget for all, `steps` (default 600 steps of batch 128, 1.28 epochs,
a multiple of DeepTwist's SD = 200), because a 2-core CPU trains ResNet-20 at about 190
images/s (the papers run 80-160 epochs per method):

- `deeptwist_tucker2`: DeepTwist (Lee et al. 2019), Tucker-2 at RATE, SD = 200 (the
  paper's), SGD (Nesterov, momentum 0.9) lr 0.02 cosine, weight decay 1e-4, BatchNorm
  statistics recomputed after the last distortion (50 batches);
- `tucker2`: the decomposed model trained on the same schedule (DeepTwist's baseline);
- `rsdtr`: RSDTR (Gabor & Zdunek 2024): TR-SVD at `eps` over every shift and split, the
  smallest kept, fine-tuned with SGD under PyTorch's OneCycleLR (max lr 0.01, momentum
  cycle 0.95 -> 0.85 -> 0.95, weight decay 1e-4); `eps` is set per RATE to the value
  whose search keeps about that share of the teacher's residual-conv weights (`EPS`,
  measured with `tnn.make_plan(teacher, "tr", eps=...)`; the authors' 0.5 keeps far more);
- `seqkd_mtt`: TNN's Seq-KD (Su et al. 2022), mTT (channels factored into 3 modes, as the
  authors' PyTorch code does) at RATE, one ResNet stage at a time (the stem with stage 0),
  MSE to the teacher's stage output, Adam 1e-3, only that stage trains, `steps / 3` steps
  per stage, no end-to-end phase (the paper's results). Its layers train through their
  reconstructed kernels (`forward="reconstructed"`: the same function and gradients; XLA's
  CPU backend runs the factorized m-form pipeline several times slower, the README's
  m-form measurement); the row's MACs are the factorized forward's;
- `e2ekd_mtt`: the same mTT net trained end to end for `steps` steps on the teacher's
  logits (TNN's E2E-KD: alpha 0.9 on the soft targets at temperature 4), Adam 1e-3;
- `scratch_mtt`: the same mTT net from random factors, cross-entropy, Adam 1e-3, `steps`
  steps (TNN's "from scratch" baseline).

Departures, for the CPU: Fashion-MNIST (padded to 32x32, crops of pad 2, no flips)
instead of CIFAR-10, the short common length, and 1 seed per rate.
"""

import os

from train.configs import common
from train.configs.common import opt, section

TEACHER = os.path.join(
  os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
  "teachers",
  "resnet20_fmnist.npz",
)
RATES = ("0.1", "0.2")
# RSDTR's eps per rate: the search's kept share of the teacher's residual-conv weights
# (measured on teachers/resnet20_fmnist.npz, 267,264 weights in the residual convs):
# eps 0.5: 43.4%, 0.6: 26.7%, 0.65: 21.4%, 0.7: 17.5%, 0.75: 14.4%, 0.8: 12.3%, 0.85: 9.4%.
EPS = {"0.1": 0.85, "0.2": 0.65}
ADAM = dict(optimizer="adam", lr=1e-3, schedule="constant", weight_decay=0.0, momentum=0.9)


def get_config(arg=None):
  t = common.tokens(arg)
  rate = next((x for x in t if x[0].isdigit()), "0.1")
  if rate not in RATES:
    raise ValueError(f"config arg: rate {rate!r}; allowed {RATES}.")
  steps = int(next((x[6:] for x in t if x.startswith("steps=")), 600))
  sd = min(200, steps)
  r = float(rate)
  c = common.to_fashion(common.base("cifar10", "resnet20"))
  c.init_from = TEACHER
  c.dense = section(steps=0, opt=opt(0.1))
  sgd = opt(0.02, wd=1e-4)
  c.deeptwist_tucker2 = section(
    kind="deeptwist", method="tucker2", ratio=r, sd=sd, sd_rule="", bn_batches=50,
    steps=steps, opt=sgd,
  )  # fmt: skip
  c.tucker2 = section(kind="finetune", method="tucker2", ratio=r, steps=steps, opt=sgd)
  one = opt(0.01, wd=1e-4, schedule="onecycle")
  one.nesterov, one.cycle_momentum = False, (0.85, 0.95)
  c.rsdtr = section(kind="finetune", method="tr", eps=EPS[rate], steps=steps, opt=one)
  c.seqkd_mtt = section(
    kind="seqkd", method="mtt", ratio=r, modes=3, block_steps=max(steps // 3, 1),
    e2e_steps=0, opt=dict(ADAM), forward="reconstructed",
  )  # fmt: skip
  m_tt = dict(method="mtt", ratio=r, modes=3, steps=steps, forward="reconstructed")
  c.e2ekd_mtt = section(kind="e2ekd", alpha=0.9, temperature=4.0, opt=dict(ADAM), **m_tt)
  c.scratch_mtt = section(kind="scratch", opt=dict(ADAM), **m_tt)
  c.methods = (
    "dense", "deeptwist_tucker2", "tucker2", "rsdtr", "seqkd_mtt", "e2ekd_mtt", "scratch_mtt",
  )  # fmt: skip
  c.checkpoint_every, c.log_every, c.eval_every = 100, 50, 100
  return c
