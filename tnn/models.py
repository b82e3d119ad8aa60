"""The networks the three papers compress, in Flax NNX.

Every model is a `Net`: `stem`, a list of `blocks` (the units of sequential
distillation) and a `head`; `model(x)` runs them in order and `model.features(x)` returns
every block's output as well. Inputs are NHWC. Conv and dense layers are addressable by
their dotted path (`blocks.3.conv1`, see `tnn.plan.layer_paths`); `model.train()` /
`model.eval()` switch BatchNorm between batch and running statistics.

Dense parameter counts (BatchNorm scale and bias included, running statistics not)
match the published ones; `tests/test_models.py` checks them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from tnn import norm, ops

__all__ = [
  "Net",
  "cnn",
  "lenet5",
  "resnet18",
  "resnet20",
  "resnet32",
  "resnet34",
  "resnet50",
  "resnet56",
  "vgg16",
  "wrn28_10",
  "MODELS",
]


def _conv(s, t, k, rngs, stride=1, bias=False, padding=None):
  # Symmetric k // 2 padding, as PyTorch's (torchvision, the CIFAR ResNets of the RSDTR
  # authors): the same as 'SAME' at stride 1, but at stride 2 'SAME' pads (0, 1) and
  # would misalign every pretrained PyTorch kernel by one pixel.
  if padding is None:
    padding = ((k // 2, k // 2), (k // 2, k // 2))
  return nnx.Conv(
    s,
    t,
    (k, k),
    strides=(stride, stride),
    padding=padding,
    use_bias=bias,
    kernel_init=nnx.initializers.variance_scaling(2.0, "fan_out", "normal"),
    conv_general_dilated=ops.conv_general_dilated,
    rngs=rngs,
  )


def _bn(c, rngs):
  return norm.BatchNorm(c, momentum=0.9, epsilon=1e-5, rngs=rngs)


def _pool(x):
  return jnp.mean(x, axis=(1, 2))


class Net(nnx.Module):
  """`head(blocks[-1](...blocks[0](stem(x))))`."""

  def __init__(self, stem: nnx.Module, blocks: Sequence[nnx.Module], head: nnx.Module):
    self.stem = stem
    self.blocks = nnx.List(blocks)
    self.head = head

  def features(self, x: jax.Array) -> list:
    """`[stem(x), block_0 output, ..., block_{B-1} output, logits]`."""
    out = [self.stem(x)]
    for block in self.blocks:
      out.append(block(out[-1]))
    out.append(self.head(out[-1]))
    return out

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.stem(x)
    for block in self.blocks:
      x = block(x)
    return self.head(x)


class ConvBN(nnx.Module):
  """conv -> BatchNorm -> ReLU (ReLU optional)."""

  def __init__(self, s, t, k, rngs, stride=1, relu=True):
    self.conv = _conv(s, t, k, rngs, stride)
    self.bn = _bn(t, rngs)
    self.relu = relu

  def __call__(self, x):
    x = self.bn(self.conv(x))
    return jax.nn.relu(x) if self.relu else x


class Head(nnx.Module):
  """Global average pool (optionally after BN-ReLU, for pre-activation nets) and a dense layer."""

  def __init__(self, c, num_classes, rngs, pre_bn=False):
    self.bn = _bn(c, rngs) if pre_bn else None
    self.fc = nnx.Linear(c, num_classes, rngs=rngs)

  def __call__(self, x):
    if self.bn is not None:
      x = jax.nn.relu(self.bn(x))
    return self.fc(_pool(x))


# --- CIFAR ResNets (He et al. 2016, section 4.2), option-A shortcuts -------------------


class BasicBlock(nnx.Module):
  """Two 3x3 conv-BN, ReLU after the sum. `shortcut`: 'A' (subsample and zero-pad
  channels, no params; the CIFAR ResNets) or 'B' (1x1 conv-BN when the shape changes)."""

  def __init__(self, s, t, stride, rngs, shortcut="A"):
    self.conv1 = _conv(s, t, 3, rngs, stride)
    self.bn1 = _bn(t, rngs)
    self.conv2 = _conv(t, t, 3, rngs)
    self.bn2 = _bn(t, rngs)
    self.stride, self.pad = stride, t - s
    project = shortcut == "B" and (stride != 1 or s != t)
    self.proj = ConvBN(s, t, 1, rngs, stride, relu=False) if project else None

  def _shortcut(self, x):
    if self.proj is not None:
      return self.proj(x)
    if self.stride != 1:
      x = x[:, :: self.stride, :: self.stride, :]
    if self.pad:
      lo = self.pad // 2
      x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (lo, self.pad - lo)))
    return x

  def __call__(self, x):
    y = jax.nn.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return jax.nn.relu(y + self._shortcut(x))


class Stage(nnx.Module):
  """A sequence of residual blocks (one distillation unit)."""

  def __init__(self, blocks):
    self.layers = nnx.List(blocks)

  def __call__(self, x):
    for b in self.layers:
      x = b(x)
    return x


def _cifar_resnet(depth, num_classes, rngs, in_channels=3):
  if (depth - 2) % 6:
    raise ValueError(f"depth must be 6n + 2 (20, 32, 44, 56, 110), got {depth}.")
  n = (depth - 2) // 6
  stem = ConvBN(in_channels, 16, 3, rngs)
  stages, c = [], 16
  for i, width in enumerate((16, 32, 64)):
    blocks = []
    for j in range(n):
      blocks.append(BasicBlock(c, width, 2 if (i > 0 and j == 0) else 1, rngs))
      c = width
    stages.append(Stage(blocks))
  return Net(stem, stages, Head(64, num_classes, rngs))


def resnet20(num_classes=10, *, rngs: nnx.Rngs, in_channels=3):
  return _cifar_resnet(20, num_classes, rngs, in_channels)


def resnet32(num_classes=10, *, rngs: nnx.Rngs, in_channels=3):
  return _cifar_resnet(32, num_classes, rngs, in_channels)


def resnet56(num_classes=10, *, rngs: nnx.Rngs, in_channels=3):
  return _cifar_resnet(56, num_classes, rngs, in_channels)


# --- ImageNet ResNets ------------------------------------------------------------------


class Bottleneck(nnx.Module):
  """1x1 -> 3x3 (stride here, as in torchvision v1.5) -> 1x1 (x4), projection shortcut."""

  def __init__(self, s, width, stride, rngs):
    t = 4 * width
    self.conv1 = _conv(s, width, 1, rngs)
    self.bn1 = _bn(width, rngs)
    self.conv2 = _conv(width, width, 3, rngs, stride)
    self.bn2 = _bn(width, rngs)
    self.conv3 = _conv(width, t, 1, rngs)
    self.bn3 = _bn(t, rngs)
    self.proj = ConvBN(s, t, 1, rngs, stride, relu=False) if (stride != 1 or s != t) else None

  def __call__(self, x):
    y = jax.nn.relu(self.bn1(self.conv1(x)))
    y = jax.nn.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    return jax.nn.relu(y + (x if self.proj is None else self.proj(x)))


class ImageNetStem(nnx.Module):
  def __init__(self, rngs, in_channels=3):
    self.conv = _conv(in_channels, 64, 7, rngs, 2)
    self.bn = _bn(64, rngs)

  def __call__(self, x):
    x = jax.nn.relu(self.bn(self.conv(x)))
    return nnx.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))  # as torchvision


def _imagenet_resnet(layers, bottleneck, num_classes, rngs, in_channels=3):
  stages, c = [], 64
  for i, (n, width) in enumerate(zip(layers, (64, 128, 256, 512), strict=True)):
    blocks = []
    for j in range(n):
      stride = 2 if (i > 0 and j == 0) else 1
      if bottleneck:
        blocks.append(Bottleneck(c, width, stride, rngs))
        c = 4 * width
      else:
        blocks.append(BasicBlock(c, width, stride, rngs, shortcut="B"))
        c = width
    stages.append(Stage(blocks))
  return Net(ImageNetStem(rngs, in_channels), stages, Head(c, num_classes, rngs))


def resnet18(num_classes=1000, *, rngs: nnx.Rngs, in_channels=3):
  return _imagenet_resnet((2, 2, 2, 2), False, num_classes, rngs, in_channels)


def resnet34(num_classes=1000, *, rngs: nnx.Rngs, in_channels=3):
  return _imagenet_resnet((3, 4, 6, 3), False, num_classes, rngs, in_channels)


def resnet50(num_classes=1000, *, rngs: nnx.Rngs, in_channels=3):
  return _imagenet_resnet((3, 4, 6, 3), True, num_classes, rngs, in_channels)


# --- Wide ResNet (Zagoruyko & Komodakis 2016), pre-activation --------------------------


class WideBlock(nnx.Module):
  """BN-ReLU-conv3x3 twice; 1x1 conv shortcut when the shape changes."""

  def __init__(self, s, t, stride, rngs):
    self.bn1 = _bn(s, rngs)
    self.conv1 = _conv(s, t, 3, rngs, stride)
    self.bn2 = _bn(t, rngs)
    self.conv2 = _conv(t, t, 3, rngs)
    self.proj = _conv(s, t, 1, rngs, stride) if (stride != 1 or s != t) else None

  def __call__(self, x):
    o = jax.nn.relu(self.bn1(x))
    y = self.conv2(jax.nn.relu(self.bn2(self.conv1(o))))
    return y + (x if self.proj is None else self.proj(o))


def wrn28_10(num_classes=100, *, rngs: nnx.Rngs, in_channels=3):
  n, k = 4, 10
  stem = _conv(in_channels, 16, 3, rngs)
  stages, c = [], 16
  for i, width in enumerate((16 * k, 32 * k, 64 * k)):
    blocks = []
    for j in range(n):
      blocks.append(WideBlock(c, width, 2 if (i > 0 and j == 0) else 1, rngs))
      c = width
    stages.append(Stage(blocks))
  return Net(stem, stages, Head(c, num_classes, rngs, pre_bn=True))


# --- VGG-16 (CIFAR: BN, one classifier layer) and LeNet-5 ------------------------------


class VGGStage(nnx.Module):
  def __init__(self, s, widths, rngs, pool=True):
    layers, c = [], s
    for w in widths:
      layers.append(ConvBN(c, w, 3, rngs))
      c = w
    self.layers = nnx.List(layers)
    self.pool = pool

  def __call__(self, x):
    for layer in self.layers:
      x = layer(x)
    return nnx.max_pool(x, (2, 2), (2, 2)) if self.pool else x


def vgg16(num_classes=10, *, rngs: nnx.Rngs, in_channels=3):
  cfg = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
  stages, c = [], in_channels
  for widths in cfg:
    stages.append(VGGStage(c, widths, rngs))
    c = widths[-1]
  return Net(Flatten(identity=True), stages, Head(512, num_classes, rngs))


class Flatten(nnx.Module):
  def __init__(self, identity=False):
    self.identity = identity

  def __call__(self, x):
    return x if self.identity else x.reshape(x.shape[0], -1)


class LeNetBlock(nnx.Module):
  def __init__(self, s, t, rngs):
    self.conv = nnx.Conv(
      s, t, (5, 5), padding="VALID", conv_general_dilated=ops.conv_general_dilated, rngs=rngs
    )

  def __call__(self, x):
    return nnx.max_pool(jax.nn.relu(self.conv(x)), (2, 2), (2, 2))


class MLPHead(nnx.Module):
  def __init__(self, sizes, rngs):
    self.layers = nnx.List(
      nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:], strict=True)
    )

  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    for i, layer in enumerate(self.layers):
      x = layer(x)
      if i + 1 < len(self.layers):
        x = jax.nn.relu(x)
    return x


def lenet5(num_classes=10, *, rngs: nnx.Rngs, in_channels=1):
  """LeNet-5 (LeCun et al. 1998) for 28x28 input padded to 32x32 by its first conv."""
  stem = nnx.Conv(
    in_channels,
    6,
    (5, 5),
    padding=((2, 2), (2, 2)),
    conv_general_dilated=ops.conv_general_dilated,
    rngs=rngs,
  )
  blocks = [LeNetBlock(6, 16, rngs)]
  return Net(_ReluPool(stem), blocks, MLPHead((16 * 5 * 5, 120, 84, num_classes), rngs))


class _ReluPool(nnx.Module):
  def __init__(self, conv):
    self.conv = conv

  def __call__(self, x):
    return nnx.max_pool(jax.nn.relu(self.conv(x)), (2, 2), (2, 2))


def cnn(num_classes=10, *, rngs: nnx.Rngs, in_channels=1, widths=(32, 64, 128)):
  """A small VGG-style CNN (3x3 conv-BN-ReLU, 2x2 max-pool per stage): the demo net."""
  stem = ConvBN(in_channels, widths[0], 3, rngs)
  stages, c = [], widths[0]
  for i, w in enumerate(widths):
    ws = (w,) if i == 0 else (w, w)
    stages.append(VGGStage(c, ws, rngs))
    c = w
  return Net(stem, stages, Head(c, num_classes, rngs))


MODELS: dict[str, Callable[..., Net]] = {
  "cnn": cnn,
  "lenet5": lenet5,
  "resnet20": resnet20,
  "resnet32": resnet32,
  "resnet56": resnet56,
  "vgg16": vgg16,
  "wrn28_10": wrn28_10,
  "resnet18": resnet18,
  "resnet34": resnet34,
  "resnet50": resnet50,
}
