r"""RSDTR (Gabor & Zdunek) on ImageNet ResNet-18 and ResNet-34: TR-SVD of every residual
3x3 kernel at relative error `eps`, the storage-minimal circular shift kept, the
4-sublayer TR net fine-tuned.

  python -m train --config train/configs/rsdtr_imagenet.py:resnet18 --workdir DIR \
      --config.data_dir=/path/to/tensorflow_datasets
  python -m train --config train/configs/rsdtr_imagenet.py:resnet34,eps=0.5 --workdir DIR \
      --config.data_dir=/path/to/tensorflow_datasets
  python -m train --config train/configs/rsdtr_imagenet.py:resnet18,fmnist --workdir DIR

ARG: resnet18 or resnet34 (default resnet18), optionally `eps=<float>` (default 0.3) and
`fmnist`. Data: tfds `imagenet2012`, prepared beforehand (`tfds build imagenet2012`
with TensorFlow and the manually downloaded archives); it is streamed: each batch's
records are decoded and cropped to 224x224 on the host by a thread pool while the device
trains on the previous batch, every process reading only its own rows.
The paper fine-tunes torchvision's pretrained nets; we ship no weights, so the dense net
is trained here first (90 epochs, SGD with Nesterov momentum, lr 0.1 for batch 256,
cosine, weight decay 1e-4: He et al.'s recipe with a cosine schedule), then decomposed
and fine-tuned (10 epochs, lr 0.01). Hardware: a multi-GPU host or several
(`--jax_distributed`); roughly a week of one H100 for the dense phase. Expected: not yet
measured with this config (torchvision's dense ResNet-18 / 34 reach 69.8% / 73.3% top-1).
"""

from train.configs import common
from train.configs.common import epochs, opt, section


def get_config(arg=None):
  t = common.tokens(arg)
  model = next((x for x in t if x.startswith("resnet")), "resnet18")
  if model not in ("resnet18", "resnet34"):
    raise ValueError(f"config arg: model {model!r}; allowed resnet18, resnet34.")
  eps = float(next((x[4:] for x in t if x.startswith("eps=")), 0.3))
  c = common.imagenet(common.base("tfds:imagenet2012", model, batch_size=256))
  if "fmnist" in t:
    common.to_fashion(c)
    c.batch_size = 128
  c.methods = ("dense", "finetune")
  c.dense = section(steps=epochs(c, 90), opt=opt(0.1 * c.batch_size / 256, wd=1e-4))
  c.finetune = section(method="tr", eps=eps, steps=epochs(c, 10), opt=opt(0.01, wd=1e-4))
  return c
