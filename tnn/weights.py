"""Pretrained PyTorch weights into `tnn.models` ResNets.

- `from_torchvision(model, state_dict)`: torchvision's ResNet-18/34/50 (key names of
  `torchvision.models.resnet`: `conv1`, `bn1`, `layer{1..4}.{j}.conv{k}` / `bn{k}` /
  `downsample.{0,1}`, `fc`) into `tnn.models.resnet18/34/50`. The v1.5 bottleneck puts
  its stride on the 3x3 conv (`conv2`), as `tnn.models.Bottleneck` does.
- `from_cifar_resnet(model, state_dict)`: the CIFAR ResNets of the RSDTR authors'
  `models/resnet_cifar.py` (`conv1`, `bn1`, `layer{1..3}.{j}...`, `linear`; option-A
  shortcuts, which have no weights) into `tnn.models.resnet20/32/56`.
- `read_state_dict(path)`: a `.safetensors` file (read with the `safetensors` package,
  no torch needed) or a `.pth` / `.pt` file (needs torch; `weights_only=True`), as a dict
  of numpy arrays. A `.pth` holding `{"state_dict": ...}` or `{"model": ...}` is unwrapped,
  and a `module.` prefix (DataParallel) is dropped.

Layouts: conv weights OIHW -> HWIO, linear weights `(out, in)` -> `(in, out)`. BatchNorm:
`weight`, `bias`, `running_mean`, `running_var` -> `scale`, `bias`, `mean`, `var`;
`num_batches_tracked` is dropped. PyTorch's BatchNorm2d defaults (eps 1e-5, momentum 0.1,
running <- 0.9 running + 0.1 batch) are `tnn.models`' (epsilon 1e-5, flax momentum 0.9),
so eval-mode outputs agree; in training, PyTorch updates `running_var` with the unbiased
batch variance and flax with the biased one. Convs pad `k // 2` on both sides as PyTorch
does (`tnn.models._conv`), and the ImageNet stem's max-pool pads 1, as torchvision's.

Every key is checked: a missing key, an unexpected key or a wrong shape is a
`ValueError` that names the key and both shapes.
"""

from __future__ import annotations

import os
import re

import jax.numpy as jnp
import numpy as np
from flax import nnx

_BN = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}


def _ours(key: str, head: str) -> str | None:
  """Our dotted variable path for a PyTorch key, or None for a key that carries nothing
  (`num_batches_tracked`). Raises KeyError for a key with no place in the model."""
  parts = key.split(".")
  if parts[-1] == "num_batches_tracked":
    return None
  leaf = parts[-1]
  if parts[0] in ("conv1", "bn1") and len(parts) == 2:
    mod = "stem.conv" if parts[0] == "conv1" else "stem.bn"
  elif parts[0] == head and len(parts) == 2:
    return f"head.fc.{'kernel' if leaf == 'weight' else 'bias'}"
  elif (m := re.fullmatch(r"layer(\d+)", parts[0])) and len(parts) >= 4:
    stage, block = int(m.group(1)) - 1, int(parts[1])
    where = f"blocks.{stage}.layers.{block}"
    if parts[2] == "downsample" and parts[3] in ("0", "1") and len(parts) == 5:
      mod = f"{where}.proj.{'conv' if parts[3] == '0' else 'bn'}"
    elif re.fullmatch(r"(conv|bn)\d", parts[2]) and len(parts) == 4:
      mod = f"{where}.{parts[2]}"
    else:
      raise KeyError(key)
  else:
    raise KeyError(key)
  if mod.split(".")[-1].startswith("conv"):
    if leaf != "weight":
      raise KeyError(key)
    return f"{mod}.kernel"
  if leaf not in _BN:
    raise KeyError(key)
  return f"{mod}.{_BN[leaf]}"


def _to_ours(name: str, a: np.ndarray) -> np.ndarray:
  if name.endswith(".kernel") and a.ndim == 4:  # conv OIHW -> HWIO
    return np.transpose(a, (2, 3, 1, 0))
  if name.endswith(".kernel") and a.ndim == 2:  # linear (out, in) -> (in, out)
    return a.T
  return a


def _torch_shape(name: str, shape: tuple) -> tuple:
  """The PyTorch shape that a variable of ours of `shape` comes from."""
  if name.endswith(".kernel") and len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  if name.endswith(".kernel") and len(shape) == 2:
    return (shape[1], shape[0])
  return tuple(shape)


def _variables(model: nnx.Module) -> dict:
  """`{dotted path: nnx.Variable}` of `model` (parameters and BatchNorm statistics)."""
  return {
    ".".join(str(p) for p in path): v
    for path, v in nnx.iter_graph(model)
    if isinstance(v, nnx.Variable)
  }


def assign(model: nnx.Module, state_dict: dict, *, head: str) -> nnx.Module:
  """Fills `model` (in place; returned) from a PyTorch ResNet state dict whose classifier
  is `head` (`fc` or `linear`)."""
  ours = _variables(model)
  mapped, unexpected = {}, []
  for key, value in state_dict.items():
    try:
      name = _ours(key, head)
    except KeyError:
      unexpected.append(key)
      continue
    if name is None:
      continue
    if name not in ours:
      unexpected.append(key)
      continue
    mapped[name] = (key, np.asarray(value))
  if unexpected:
    raise ValueError(
      f"state_dict: unexpected key(s) {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''} "
      f"for this {type(model).__name__} (no such layer in it)."
    )
  missing = [n for n in ours if n not in mapped]
  if missing:
    raise ValueError(
      f"state_dict: missing the weights of {missing[:5]}{' ...' if len(missing) > 5 else ''}."
    )
  for name, (key, a) in mapped.items():
    want = _torch_shape(name, ours[name].get_value().shape)
    if tuple(a.shape) != want:
      raise ValueError(
        f"state_dict: {key!r} has shape {tuple(a.shape)}; this model's {name} needs {want}."
      )
  for name, (_, a) in mapped.items():
    v = ours[name]
    v.set_value(jnp.asarray(_to_ours(name, a), dtype=v.get_value().dtype))
  return model


def from_torchvision(model: nnx.Module, state_dict: dict) -> nnx.Module:
  """torchvision ResNet-18/34/50 weights into `tnn.models.resnet18/34/50` (see the module
  docstring)."""
  return assign(model, state_dict, head="fc")


def from_cifar_resnet(model: nnx.Module, state_dict: dict) -> nnx.Module:
  """The RSDTR authors' CIFAR ResNet weights into `tnn.models.resnet20/32/56`."""
  return assign(model, state_dict, head="linear")


def read_state_dict(path: str) -> dict:
  """A PyTorch state dict as `{key: numpy array}` from `.safetensors` or `.pth`/`.pt`."""
  if not os.path.isfile(path):
    raise ValueError(f"weights: no file {path!r}.")
  ext = os.path.splitext(path)[1].lower()
  if ext == ".safetensors":
    try:
      from safetensors.numpy import load_file
    except ImportError:
      raise ValueError("weights: reading .safetensors needs `pip install safetensors`.") from None
    try:
      return dict(load_file(path))
    except Exception as e:  # the package raises its own error types for corrupt files
      raise ValueError(f"weights: {path} is not a readable safetensors file ({e}).") from None
  if ext in (".pth", ".pt"):
    try:
      import torch
    except ImportError:
      raise ValueError(
        f"weights: reading {ext} needs torch (pip install -e '.[torch]'), or convert the "
        "file to .safetensors."
      ) from None
    try:
      obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
      raise ValueError(f"weights: {path} is not a readable PyTorch file ({e}).") from None
    for k in ("state_dict", "model"):
      if isinstance(obj, dict) and isinstance(obj.get(k), dict):
        obj = obj[k]
    if not isinstance(obj, dict):
      raise ValueError(f"weights: {path} holds a {type(obj).__name__}, not a state dict.")
    return {
      k.removeprefix("module."): v.detach().cpu().numpy()
      for k, v in obj.items()
      if hasattr(v, "detach")
    }
  raise ValueError(f"weights: {path}: unknown format {ext!r}; allowed .safetensors, .pth, .pt.")
