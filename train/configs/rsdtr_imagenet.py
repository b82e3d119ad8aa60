r"""RSDTR (Gabor & Zdunek 2024) on ImageNet ResNet-18 and ResNet-34, as the authors' code runs
it (`mateuszgabor/rsdtr_compression`, commit cdb5ecf: `imagenet.py`): from torchvision's
pretrained net, TR-SVD of every residual 3x3 kernel at eps (the storage-minimal shift and
split kept), the 4-sublayer TR net fine-tuned.

  python -m train --config train/configs/rsdtr_imagenet.py:resnet18 --workdir DIR \
      --config.data_dir=/path/to/tensorflow_datasets --config.init_from=resnet18.safetensors
  python -m train --config train/configs/rsdtr_imagenet.py:resnet34,eps=0.5 --workdir DIR ...

ARG: resnet18 or resnet34 (default resnet18), optionally `eps=<float>` (default 0.84: the
authors' ResNet-18 weights file is named `..._0_84`). `--config.init_from` is required: a
torchvision state dict (`.safetensors`, or `.pth` with torch installed; e.g. saved from
`torchvision.models.resnet18(weights="IMAGENET1K_V1").state_dict()`), read by
`tnn.weights.from_torchvision`. Data: tfds `imagenet2012`, prepared beforehand (`tfds
build imagenet2012` with TensorFlow and the manually downloaded archives), streamed:
Inception crops to 224 for training, central crops of `validation`.

Fine-tuning: SGD under PyTorch's `OneCycleLR` (max lr 0.01, 30 epochs; its momentum cycle
0.95 -> 0.85 -> 0.95 replaces the optimizer's 0.9), weight decay 0, batch 128. Departures:
the authors train with AMP on several GPUs (DDP); here float32 unless
`--config.compute_dtype=bfloat16`, data parallel over every device. Hardware: a multi-GPU
host. Expected: not yet measured (torchvision's dense ResNet-18 / 34 reach 69.8% / 73.3%
top-1).
"""

from train.configs import common
from train.configs.common import epochs, opt, section


def get_config(arg=None):
  t = common.tokens(arg)
  model = next((x for x in t if x.startswith("resnet")), "resnet18")
  if model not in ("resnet18", "resnet34"):
    raise ValueError(f"config arg: model {model!r}; allowed resnet18, resnet34.")
  eps = float(next((x[4:] for x in t if x.startswith("eps=")), 0.84))
  c = common.imagenet(common.base("tfds:imagenet2012", model, batch_size=128))
  c.require_init_from = True  # the recipe starts from torchvision's pretrained weights
  c.methods = ("dense", "finetune")
  c.dense = section(steps=0, opt=opt(0.1, wd=1e-4))  # 0: the pretrained net as it is
  ft = opt(0.01, wd=0.0, schedule="onecycle")
  ft.nesterov, ft.cycle_momentum = False, (0.85, 0.95)
  c.finetune = section(method="tr", eps=eps, steps=epochs(c, 30), opt=ft)
  return c
