r"""The main job: Fashion-MNIST, the kept CNN teacher, three compression methods at ~10% of
the conv parameters.

Command (from the checkout; Fashion-MNIST from `apt-get install dataset-fashion-mnist`):

  python -m train --config train/configs/demo.py --workdir /tmp/demo
  python -m train --config train/configs/demo.py:pretrain --workdir /tmp/demo   # train the CNN too

Hardware: a 2-core x86 CPU (no GPU). Expected: see the README's measured table (time and
accuracy of the last run). Starts from `teachers/cnn_fmnist.npz` (`tnn.models.cnn`,
widths 16/32/64, 0.07M params; `train/configs/teachers.py:cnn`), or with `pretrain`
trains that CNN here first (800 steps). From it: DeepTwist (Tucker-2, 1280 steps, a
distortion every 40, BatchNorm recomputed after the last), RSDTR fine-tuning (TR-SVD at
eps 0.9 with the storage-minimal circular shift and rank split, as Gabor & Zdunek choose
the TR format, 11% of the conv weights, 1280 steps, as many as DeepTwist), and TNN Seq-KD
(TT layers at 10%, 200 steps per block with Adam at 1e-3 as the TNN authors train, then
1200 of end-to-end distillation). The lengths are the longest that keep the run under 10
minutes on a 2-core CPU (length is what brings the compressed nets closest to the teacher
here: the README's demo section). RSDTR's eps search replaces TR ranks at a uniform 10% with shift 0
(0.8816 at 720 steps; the README's demo table).
The decomposed nets' BatchNorm statistics are recomputed before training (`bn_batches`;
`nobn` in ARG turns that off, for the before/after figure in the README). The m-forms
(mTT...) run their spatial conv once per output channel, many more MACs than TT at equal
size, so the CPU demo uses the plain TT layer. Prints a table and writes results.json and
two PNG plots.
"""

import os

from train.configs import common
from train.configs.common import opt, section

TEACHER = os.path.join(
  os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
  "teachers",
  "cnn_fmnist.npz",
)


def get_config(arg=None):
  t = common.tokens(arg)
  c = common.base("fashion_mnist", "cnn")  # data_dir "": Debian's folder
  c.model_kwargs = section(widths=(16, 32, 64))
  c.augment = section(crop_pad=0, flip=False)  # 28x28, no augmentation
  c.checkpoint_every = 200
  c.log_every = 20
  c.eval_every = 80
  c.methods = ("dense", "deeptwist", "finetune", "seqkd")
  if "pretrain" in t:
    c.dense = section(steps=800, opt=opt(0.05))
  else:
    c.init_from = TEACHER
    c.dense = section(steps=0, opt=opt(0.05))
  bn = 0 if "nobn" in t else 20
  c.deeptwist = section(
    method="tucker2", ratio=0.1, sd=40, steps=1280, bn_batches=bn, opt=opt(0.02)
  )
  c.finetune = section(
    method="tr", eps=0.9, steps=1280, bn_batches=bn, opt=opt(0.02), forward="factorized"
  )
  # Seq-KD with Adam at 1e-3, the TNN authors' optimizer (SGD at 0.02 here: 0.8042).
  adam = dict(optimizer="adam", lr=1e-3, schedule="constant", weight_decay=0.0, momentum=0.9)
  c.seqkd = section(
    method="tt",
    ratio=0.1,
    block_steps=200,
    e2e_steps=1200,
    alpha=0.9,
    temperature=4.0,
    bn_batches=bn,
    opt=adam,
    forward="factorized",
  )
  return c
