"""PyTorch weights in: our eval-mode forward equals PyTorch's on the same images.

The oracle is a PyTorch module with torchvision's ResNet structure and key names
(torchvision itself does not import beside torch 2.13 here), and one with the RSDTR
authors' CIFAR ResNet structure, randomly initialised, BatchNorm statistics included.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")  # the `test` extra installs torch 2.13 (CPU)
nn, F = torch.nn, torch.nn.functional

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

import tnn  # noqa: E402
from tnn import weights  # noqa: E402


class TVBasic(nn.Module):
  expansion = 1

  def __init__(self, i, w, stride, down):
    super().__init__()
    self.conv1, self.bn1 = nn.Conv2d(i, w, 3, stride, 1, bias=False), nn.BatchNorm2d(w)
    self.conv2, self.bn2 = nn.Conv2d(w, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w)
    self.downsample = down

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class TVBottleneck(nn.Module):
  expansion = 4

  def __init__(self, i, w, stride, down):
    super().__init__()
    self.conv1, self.bn1 = nn.Conv2d(i, w, 1, bias=False), nn.BatchNorm2d(w)
    self.conv2, self.bn2 = nn.Conv2d(w, w, 3, stride, 1, bias=False), nn.BatchNorm2d(w)  # v1.5
    self.conv3, self.bn3 = nn.Conv2d(w, 4 * w, 1, bias=False), nn.BatchNorm2d(4 * w)
    self.downsample = down

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = F.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class TVResNet(nn.Module):
  """torchvision.models.resnet.ResNet's structure and key names."""

  def __init__(self, block, layers, num_classes=1000):
    super().__init__()
    self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
    self.bn1, self.relu, self.maxpool = nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1)
    c = 64
    for i, (n, w) in enumerate(zip(layers, (64, 128, 256, 512), strict=True)):
      blocks = []
      for j in range(n):
        stride = 2 if i > 0 and j == 0 else 1
        down = None
        if stride != 1 or c != w * block.expansion:
          down = nn.Sequential(
            nn.Conv2d(c, w * block.expansion, 1, stride, bias=False),
            nn.BatchNorm2d(w * block.expansion),
          )
        blocks.append(block(c, w, stride, down))
        c = w * block.expansion
      setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
    self.avgpool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(c, num_classes)

  def forward(self, x):
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    for i in range(1, 5):
      x = getattr(self, f"layer{i}")(x)
    return self.fc(torch.flatten(self.avgpool(x), 1))


class CifarBlock(nn.Module):
  """The RSDTR authors' models/resnet_cifar.py BasicBlock (option A)."""

  def __init__(self, i, w, stride):
    super().__init__()
    self.conv1, self.bn1 = nn.Conv2d(i, w, 3, stride, 1, bias=False), nn.BatchNorm2d(w)
    self.conv2, self.bn2 = nn.Conv2d(w, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w)
    self.short = stride != 1 or i != w
    self.w = w

  def forward(self, x):
    y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
    s = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.w // 4, self.w // 4)) if self.short else x
    return F.relu(y + s)


class CifarResNet(nn.Module):
  def __init__(self, n, num_classes=10):
    super().__init__()
    self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16)
    c = 16
    for i, w in enumerate((16, 32, 64)):
      blocks = []
      for j in range(n):
        blocks.append(CifarBlock(c, w, 2 if i > 0 and j == 0 else 1))
        c = w
      setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
    self.linear = nn.Linear(64, num_classes)

  def forward(self, x):
    x = F.relu(self.bn1(self.conv1(x)))
    x = self.layer3(self.layer2(self.layer1(x)))
    return self.linear(F.avg_pool2d(x, x.size()[3]).flatten(1))


def _randomised(module):
  """Random weights and BatchNorm statistics (the defaults would make BN the identity)."""
  g = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for m in module.modules():
      if isinstance(m, nn.BatchNorm2d):
        m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
        m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
        m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
        m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
  return module.eval()


def _state(module):
  return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def _compare(torch_model, ours, size):
  x = np.random.default_rng(0).standard_normal((2, 3, size, size)).astype(np.float32)
  with torch.no_grad():
    want = torch_model(torch.from_numpy(x)).numpy()
  ours.eval()
  got = np.asarray(jax.jit(lambda m, v: m(v))(ours, jnp.asarray(x.transpose(0, 2, 3, 1))))
  assert got.dtype == np.float32
  scale = np.abs(want).max()
  np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * scale * max(1, np.sqrt(size / 32)))
  return got


@pytest.mark.parametrize(
  "name,block,layers",
  [("resnet18", TVBasic, (2, 2, 2, 2)), ("resnet50", TVBottleneck, (3, 4, 6, 3))],
)
def test_torchvision_resnet_forward_matches_torch(name, block, layers):
  tm = _randomised(TVResNet(block, layers))
  ours = weights.from_torchvision(tnn.models.MODELS[name](rngs=nnx.Rngs(1)), _state(tm))
  _compare(tm, ours, 64)  # 64x64: strides 2, 4, ..., 32 all exercised, and quick


def test_cifar_resnet_forward_matches_torch():
  tm = _randomised(CifarResNet(3))
  ours = weights.from_cifar_resnet(tnn.models.resnet20(rngs=nnx.Rngs(1)), _state(tm))
  _compare(tm, ours, 32)


def test_the_file_readers_give_the_same_state_dict(tmp_path):
  tm = _randomised(CifarResNet(3))
  sd = _state(tm)
  torch.save(tm.state_dict(), tmp_path / "w.pth")
  torch.save(
    {"state_dict": {f"module.{k}": v for k, v in tm.state_dict().items()}}, tmp_path / "w2.pth"
  )
  for path in ("w.pth", "w2.pth"):
    got = weights.read_state_dict(str(tmp_path / path))
    assert got.keys() == sd.keys()
    for k in sd:
      np.testing.assert_array_equal(got[k], sd[k])
  safetensors = pytest.importorskip("safetensors.numpy")
  safetensors.save_file(sd, str(tmp_path / "w.safetensors"))
  got = weights.read_state_dict(str(tmp_path / "w.safetensors"))
  for k in sd:
    np.testing.assert_array_equal(got[k], sd[k])
  (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 40)
  with pytest.raises(ValueError, match="not a readable safetensors"):
    weights.read_state_dict(str(tmp_path / "bad.safetensors"))
  (tmp_path / "w.npz").write_bytes(b"")
  with pytest.raises(ValueError, match="unknown format '.npz'"):
    weights.read_state_dict(str(tmp_path / "w.npz"))
  (tmp_path / "cut.pth").write_bytes((tmp_path / "w.pth").read_bytes()[:100])
  with pytest.raises(ValueError, match="not a readable PyTorch file"):
    weights.read_state_dict(str(tmp_path / "cut.pth"))


def test_missing_unexpected_and_misshaped_keys_are_named():
  sd = _state(_randomised(CifarResNet(3)))
  model = lambda: tnn.models.resnet20(rngs=nnx.Rngs(1))  # noqa: E731
  bad = dict(sd)
  del bad["layer2.1.conv2.weight"]
  with pytest.raises(ValueError, match=r"missing .*blocks\.1\.layers\.1\.conv2\.kernel"):
    weights.from_cifar_resnet(model(), bad)
  with pytest.raises(ValueError, match=r"unexpected key\(s\) \['layer4\.0\.conv1\.weight'\]"):
    weights.from_cifar_resnet(model(), dict(sd, **{"layer4.0.conv1.weight": sd["conv1.weight"]}))
  bad = dict(sd, **{"layer1.0.conv1.weight": np.zeros((16, 16, 5, 5), np.float32)})
  with pytest.raises(
    ValueError,
    match=r"'layer1\.0\.conv1\.weight' has shape \(16, 16, 5, 5\); .* needs \(16, 16, 3, 3\)",
  ):
    weights.from_cifar_resnet(model(), bad)
  with pytest.raises(ValueError, match="unexpected key"):  # a torchvision file into a CIFAR net
    weights.from_torchvision(model(), sd)
