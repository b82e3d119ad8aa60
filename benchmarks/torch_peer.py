"""The PyTorch peer of `benchmarks.layers`: the same CIFAR ResNet-32 training step in eager
PyTorch, dense or with its residual 3x3 convs factorized by TensorLy-Torch.

The net is `tnn.models.resnet32`'s architecture (He et al. 2016, section 4.2: 3x3 stem
16 channels, 3 stages of 5 basic blocks at 16/32/64 channels, option-A shortcuts that
subsample and zero-pad channels, global average pool, a dense layer), NCHW tensors in
`channels_last` memory (PyTorch's fast CPU layout). The step is the one ours runs: the
uint8 batch normalised, forward in train mode (batch statistics), softmax cross-entropy,
backward, SGD with momentum 0.9. Factorized convs are `tltorch.FactorizedConv.from_conv(
conv, rank=ratio, factorization=..., implementation="factorized")` (TensorLy-Torch 0.5:
the factors run as a pipeline of small convs, never rebuilding the kernel), with random
factors (speed does not depend on their values). TensorLy-Torch has no tensor-ring conv.

Needs the `bench` extra (`pip install -e ".[bench]"`: torch 2.13 CPU, tensorly-torch).
"""

from __future__ import annotations

KINDS = {"tucker2": "tucker", "cp": "cp", "tt": "tt"}  # ours -> TensorLy-Torch's name


def available() -> str | None:
  """None when the peer can run, else why not (one line)."""
  try:
    import tltorch  # noqa: F401
    import torch  # noqa: F401
  except ImportError as e:
    return f"the PyTorch peer needs the bench extra (pip install -e '.[bench]'): {e}"
  return None


def _resnet32(ratio: float | None, factorization: str | None):
  import torch
  import torch.nn.functional as F
  from torch import nn

  def conv3(i, o, stride=1):
    c = nn.Conv2d(i, o, 3, stride, 1, bias=False)
    if factorization is None:
      return c
    import tltorch

    return tltorch.FactorizedConv.from_conv(
      c,
      rank=ratio,
      factorization=factorization,
      implementation="factorized",
      decompose_weights=False,
    )

  class Block(nn.Module):
    def __init__(self, i, o, stride):
      super().__init__()
      self.conv1, self.bn1 = conv3(i, o, stride), nn.BatchNorm2d(o)
      self.conv2, self.bn2 = conv3(o, o), nn.BatchNorm2d(o)
      self.stride, self.pad = stride, o - i

    def forward(self, x):
      y = F.relu(self.bn1(self.conv1(x)))
      y = self.bn2(self.conv2(y))
      s = x[:, :, :: self.stride, :: self.stride] if self.stride != 1 else x
      if self.pad:
        lo = self.pad // 2
        s = F.pad(s, (0, 0, 0, 0, lo, self.pad - lo))
      return F.relu(y + s)

  class ResNet32(nn.Module):
    def __init__(self):
      super().__init__()
      self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16)
      blocks, c = [], 16
      for i, w in enumerate((16, 32, 64)):
        for j in range(5):
          blocks.append(Block(c, w, 2 if i > 0 and j == 0 else 1))
          c = w
      self.blocks, self.fc = nn.Sequential(*blocks), nn.Linear(64, 10)

    def forward(self, x):
      x = self.blocks(F.relu(self.bn1(self.conv1(x))))
      return self.fc(x.mean((2, 3)))

  torch.manual_seed(0)
  return ResNet32()


def train_step_rows(kinds, batch: int, steps: int, ratio: float) -> dict:
  """`{kind: (median ms, first-step ms, params)}` of the peer's train step, `kind` "dense" or
  one of `KINDS`; kinds the peer lacks are left out."""
  import torch
  import torch.nn.functional as F

  from benchmarks import common

  out = {}
  for kind in kinds:
    if kind != "dense" and kind not in KINDS:
      continue
    model = _resnet32(ratio, None if kind == "dense" else KINDS[kind])
    model = model.to(memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (batch,), generator=g)

    def step(model=model, opt=opt, images=images, labels=labels):
      x = ((images.float() / 255.0 - 0.5) / 0.25).contiguous(memory_format=torch.channels_last)
      loss = F.cross_entropy(model(x), labels)
      opt.zero_grad(set_to_none=True)
      loss.backward()
      opt.step()

    # CPU torch runs synchronously: each call has finished when it returns.
    t = common.timeit(step, repeats=steps, warmup=3)
    n_params = sum(p.numel() for p in model.parameters())
    out[kind] = (t["median_ms"], t["first_ms"], n_params)
  return out


def main(argv=None) -> None:
  """`python -m benchmarks.torch_peer --kinds dense,tucker2 --batch 128 --steps 20 --ratio
  0.25`: `train_step_rows` as one JSON line (with torch's version). `benchmarks.layers`
  runs the peer this way, in its own process, so that the peer keeps PyTorch's own
  process settings (glibc's malloc defaults) whatever ours are."""
  import argparse
  import json

  import torch

  p = argparse.ArgumentParser()
  p.add_argument("--kinds", required=True)
  p.add_argument("--batch", type=int, required=True)
  p.add_argument("--steps", type=int, required=True)
  p.add_argument("--ratio", type=float, required=True)
  a = p.parse_args(argv)
  rows = train_step_rows(a.kinds.split(","), a.batch, a.steps, a.ratio)
  print(json.dumps(dict(torch=torch.__version__, rows=rows)))


if __name__ == "__main__":
  main()
