r"""Issue 4, section 4: every method at ~10% and ~20% of the residual conv weights of a
CIFAR ResNet on Fashion-MNIST (padded to 32x32), from one dense pretraining.

  python -m train --config train/configs/section4.py:resnet20 --workdir DIR       # GPU length
  python -m train --config train/configs/section4.py:resnet20,cpu --workdir DIR   # short CPU run

ARG: resnet20 or resnet32 (default resnet20); `cpu` shortens every phase (dense 1 epoch,
each method 0.2 epoch) for a 2-core CPU (~45 min). The README's section-4 table gives what was
measured, with the command and machine.

Pairs to compare, at equal size (same layer kind and ranks):
- `deeptwist_R` (Tucker-2, SD by the quadratic-model rule capped at a quarter of the
  phase, so that it distorts at least 4 times; BN recalibrated) against
  `tucker_R` (the decomposed Tucker-2 net trained as long: DeepTwist's baseline);
- `seqkd_R` (TR layers, Seq-KD block by block, then E2E-KD) against `rsdtr_R` (the same TR
  net fine-tuned with cross-entropy: RSDTR's recipe, TR ranks by ratio, shift 0).
"""

from train.configs import common
from train.configs.common import epochs, opt, section


def get_config(arg=None):
  t = common.tokens(arg)
  model = next((x for x in t if x.startswith("resnet")), "resnet20")
  if model not in ("resnet20", "resnet32"):
    raise ValueError(f"config arg: model {model!r}; allowed resnet20, resnet32.")
  cpu = "cpu" in t
  c = common.to_fashion(common.base("cifar10", model))
  c.log_every = 20 if cpu else 100
  c.checkpoint_every = 200 if cpu else 1000
  dense_ep, method_ep = (1, 0.2) if cpu else (60, 20)
  c.dense = section(steps=epochs(c, dense_ep), opt=opt(0.1, wd=1e-4))
  n = 4 * -(-epochs(c, method_ep) // 4)  # a multiple of 4: DeepTwist's capped SD divides it
  n_blocks = 3  # stages of a CIFAR ResNet: the Seq-KD blocks
  block_steps = max(n // (3 * n_blocks), 1)  # a third of the steps block by block, then E2E
  methods = ["dense"]
  for pct in (10, 20):
    r = pct / 100
    c[f"deeptwist_{pct}"] = section(
      kind="deeptwist",
      method="tucker2",
      ratio=r,
      sd=0,
      sd_rule="quadratic",
      sd_recover=0.1,
      sd_batches=4,
      sd_max=max(n // 4, 1),
      bn_batches=20,
      steps=n,
      opt=opt(0.02, wd=1e-4),
    )
    c[f"tucker_{pct}"] = section(
      kind="finetune", method="tucker2", ratio=r, steps=n, opt=opt(0.02, wd=1e-4)
    )
    c[f"rsdtr_{pct}"] = section(
      kind="finetune", method="tr", ratio=r, steps=n, opt=opt(0.02, wd=1e-4)
    )
    c[f"seqkd_{pct}"] = section(
      kind="seqkd",
      method="tr",
      ratio=r,
      block_steps=block_steps,
      e2e_steps=n - n_blocks * block_steps,
      alpha=0.9,
      temperature=4.0,
      opt=opt(0.02, wd=1e-4),
    )
    methods += [f"deeptwist_{pct}", f"tucker_{pct}", f"rsdtr_{pct}", f"seqkd_{pct}"]
  c.methods = tuple(methods)
  return c
