r"""Fidelity study, small net: DeepTwist against training the decomposed model at equal ranks,
and RSDTR fine-tuning, on the kept Fashion-MNIST CNN teacher.

  python -m train --config train/configs/fidelity_cnn.py[:steps=N] --workdir DIR --config.seed=S
  bash benchmarks/fidelity.sh cnn            # the 3 seeds, rows to benchmarks/results/

The claim tested (DeepTwist, Lee et al. 2019, arXiv:1905.10145, as `PAPERS.md` reads the
paper; no public code): at equal ranks, training the dense net with a low-rank
distortion every SD steps and then converting it reaches a higher accuracy than training
the decomposed model on the same schedule, and makes 2D SVD of the lowered
`T x (S d d)` matrix usable. The arms, all from `teachers/cnn_fmnist.npz` (test 0.9302),
every residual-style 3x3 conv but the stem at 10% of its weights (the same plan for the
two arms of each pair):

- `deeptwist_tucker2` against `tucker2` (Tucker-2, Kim et al.'s 1x1-dxd-1x1);
- `deeptwist_svd` against `svd` (the lowered `T x (S d d)` matrix, rank by ratio);
- `rsdtr` (RSDTR, Gabor & Zdunek: TR-SVD at eps 0.9, the storage-minimal shift and
  split, fine-tuned). The authors' CIFAR example uses eps 0.5, which keeps 51% of this
  teacher's conv weights (0.6: 51%, 0.7: 33%, 0.8: 20%, 0.85: 14%, 0.9: 11%, measured
  with `tnn.make_plan(teacher, "tr", eps=...)`), so eps 0.9 puts it beside the 10% arms.

Schedule, every arm alike: SGD with Nesterov momentum 0.9, lr 0.02 cosine, weight
decay 5e-4, batch 128, `steps` (default 640, 1.4 epochs) on 28x28 images without
augmentation. DeepTwist distorts every SD = 40 steps (16 distortions; the paper's 200 is
for runs of many epochs) and recomputes BatchNorm statistics after the last one. Departures
from the paper, both for the CPU: a CNN on Fashion-MNIST instead of ResNet-32 on CIFAR-10,
and 1.4 epochs instead of the paper's full schedule. Seeds change the batch order; the
teacher is the same.
"""

from train.configs import common as common_lib
from train.configs import demo
from train.configs.common import opt, section


def get_config(arg=None):
  t = common_lib.tokens(arg)
  steps = int(next((x[6:] for x in t if x.startswith("steps=")), 640))
  c = demo.get_config()
  common = dict(ratio=0.1, steps=steps, opt=opt(0.02))
  c.methods = ("dense", "deeptwist_tucker2", "tucker2", "deeptwist_svd", "svd", "rsdtr")
  for m in ("tucker2", "svd"):
    sd = min(40, steps)
    c[f"deeptwist_{m}"] = section(kind="deeptwist", method=m, sd=sd, bn_batches=20, **common)
    c[m] = section(kind="finetune", method=m, **common)
  c.rsdtr = section(kind="finetune", method="tr", eps=0.9, steps=steps, opt=opt(0.02))
  for m in ("deeptwist", "finetune", "seqkd"):
    del c[m]
  return c
