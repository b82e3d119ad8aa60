"""Conv kernel shapes `(d_h, d_w, S, T)` of the reference networks (He et al. 2016)."""


def resnet_cifar(depth: int) -> list:
  """CIFAR ResNet-(6n+2) with option-A shortcuts: the stem and every block conv."""
  n = (depth - 2) // 6
  shapes = [(3, 3, 3, 16)]
  c_in = 16
  for width in (16, 32, 64):
    for _ in range(n):
      shapes += [(3, 3, c_in, width), (3, 3, width, width)]
      c_in = width
  return shapes


def resnet50() -> list:
  """ImageNet ResNet-50 (v1.5): stem, bottleneck convs and projection shortcuts."""
  shapes = [(7, 7, 3, 64)]
  c_in = 64
  for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
    for b in range(blocks):
      shapes += [(1, 1, c_in, width), (3, 3, width, width), (1, 1, width, 4 * width)]
      if b == 0:
        shapes.append((1, 1, c_in, 4 * width))
      c_in = 4 * width
  return shapes
