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

import ml_collections


def _opt(lr, wd=5e-4, schedule="cosine"):
  return ml_collections.ConfigDict(
    dict(lr=lr, momentum=0.9, weight_decay=wd, schedule=schedule, optimizer="sgd")
  )


def get_config():
  c = ml_collections.ConfigDict()
  c.dataset = "fashion_mnist"
  c.data_dir = ""  # default: /usr/share/datasets/fashion-mnist
  c.model = "cnn"
  c.model_kwargs = ml_collections.ConfigDict(dict(widths=(16, 32, 64)))
  c.pad_to = 0  # 0: keep 28x28
  c.augment = ml_collections.ConfigDict(dict(crop_pad=0, flip=False))
  c.label_smoothing = 0.0
  c.compute_dtype = "float32"
  c.batch_size = 128
  c.seed = 0
  c.checkpoint_every = 200
  c.keep = 2
  c.log_every = 20
  c.methods = ("dense", "deeptwist", "finetune", "seqkd")
  c.dense = ml_collections.ConfigDict(dict(steps=800, opt=_opt(0.05)))
  c.deeptwist = ml_collections.ConfigDict(
    dict(method="tucker2", ratio=0.1, sd=40, steps=320, opt=_opt(0.02))
  )
  c.finetune = ml_collections.ConfigDict(dict(method="tr", ratio=0.1, steps=240, opt=_opt(0.02)))
  c.seqkd = ml_collections.ConfigDict(
    dict(
      method="tt",
      ratio=0.1,
      block_steps=40,
      e2e_steps=160,
      alpha=0.9,
      temperature=4.0,
      opt=_opt(0.02),
    )
  )
  return c
