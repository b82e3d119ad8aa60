r"""The main job: Fashion-MNIST, a small CNN, three compression methods at ~10% of the conv
parameters.

Command (from the checkout; Fashion-MNIST from `apt-get install dataset-fashion-mnist`):

  python -m train --config train/configs/demo.py --workdir /tmp/demo

Hardware: a 2-core x86 CPU (no GPU). Expected: see the README's measured table (time and
accuracy of the last run). Pretrains `tnn.models.cnn` (widths 16/32/64, 0.07M params),
then from it: DeepTwist (Tucker-2, distortion every 40 steps), RSDTR-style fine-tuning
(TR ranks at 10% of each kernel, fine-tuned), and TNN Seq-KD (TT layers, block by block,
then end-to-end distillation). The m-forms (mTT...) run their spatial conv once per output
channel, many more MACs than TT at equal size, so the CPU demo uses the plain TT layer.
Prints a table and writes results.json and two PNG plots.
"""

from train.configs import common
from train.configs.common import opt, section


def get_config():
  c = common.base("fashion_mnist", "cnn")  # data_dir "": Debian's folder
  c.model_kwargs = section(widths=(16, 32, 64))
  c.augment = section(crop_pad=0, flip=False)  # 28x28, no augmentation
  c.checkpoint_every = 200
  c.log_every = 20
  c.methods = ("dense", "deeptwist", "finetune", "seqkd")
  c.dense = section(steps=800, opt=opt(0.05))
  c.deeptwist = section(method="tucker2", ratio=0.1, sd=40, steps=320, opt=opt(0.02))
  c.finetune = section(method="tr", ratio=0.1, steps=240, opt=opt(0.02))
  c.seqkd = section(
    method="tt",
    ratio=0.1,
    block_steps=40,
    e2e_steps=160,
    alpha=0.9,
    temperature=4.0,
    opt=opt(0.02),
  )
  return c
