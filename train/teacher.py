"""Trained dense nets kept as files: parameters and BatchNorm statistics by name, in `.npz`.

A teacher file holds one array per model variable, under `params/<path>` (`nnx.Param`)
and `rest/<path>` (BatchNorm running statistics), and `__meta__`: a JSON record (model,
its keyword arguments, data set, test accuracy, the command, machine and date that made
it, and a SHA-256 of every array). `load_into(model, path)` fills a model of the same
architecture; any missing, unexpected or mis-shaped entry, or a checksum that does not
match, is a `ValueError` naming the entry (and both shapes).

  python -m train.export_teacher --workdir DIR --out teachers/NAME.npz --command "..."

exports the dense phase of a finished run (its newest good checkpoint) with the record
(`train/export_teacher.py`, a command-line tool that nothing imports).
"""

from __future__ import annotations

import json
import os
import platform
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from train import checkpoint as ckpt_lib
from train import steps as steps_lib

SLICE = 2000  # the first test images, whose accuracy the tests check against the record


def _named(model: nnx.Module) -> dict:
  _, params, rest = steps_lib.split_model(model)
  out = {}
  for prefix, tree in (("params", params), ("rest", rest)):
    for k, v in ckpt_lib.named_leaves(tree).items():
      out[f"{prefix}/{k}"] = v
  return out


def save(model: nnx.Module, path: str, meta: dict) -> None:
  """Writes `model`'s variables and `meta` (plus checksums) to `path` (atomic rename)."""
  arrays = {k: np.asarray(jax.device_get(v)) for k, v in _named(model).items()}
  meta = dict(
    meta,
    arrays={k: [list(a.shape), a.dtype.str, ckpt_lib.array_sha256(a)] for k, a in arrays.items()},
  )
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "wb") as f:
    np.savez_compressed(f, __meta__=np.asarray(json.dumps(meta)), **arrays)
  os.replace(tmp, path)


def read(path: str) -> tuple[dict, dict]:
  """`(arrays, meta)` of a teacher file, checksums verified."""
  try:
    with np.load(path, allow_pickle=False) as z:
      meta = json.loads(str(z["__meta__"]))
      arrays = {k: z[k] for k in z.files if k != "__meta__"}
  except FileNotFoundError:
    raise ValueError(f"init_from: no file {path!r}.") from None
  except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
    raise ValueError(f"init_from: {path} is not a readable teacher file ({e}).") from None
  recorded = meta.get("arrays", {})
  for k, a in arrays.items():
    if k not in recorded or ckpt_lib.array_sha256(a) != recorded[k][2]:
      raise ValueError(f"init_from: {path}: entry {k!r} does not match its checksum.")
  return arrays, meta


TORCHVISION = ("resnet18", "resnet34", "resnet50")
CIFAR_RESNETS = ("resnet20", "resnet32", "resnet56")


def init_from(model: nnx.Module, model_name: str, path: str) -> nnx.Module:
  """`config.init_from`: a teacher `.npz` (`load_into`), or PyTorch weights (`.safetensors`,
  `.pth`, `.pt`) for torchvision's ImageNet ResNets and the RSDTR authors' CIFAR ResNets
  (`tnn.weights`)."""
  if path.endswith(".npz"):
    return load_into(model, path)
  from tnn import weights

  sd = weights.read_state_dict(path)
  try:
    if model_name in TORCHVISION:
      return weights.from_torchvision(model, sd)
    if model_name in CIFAR_RESNETS:
      return weights.from_cifar_resnet(model, sd)
  except ValueError as e:
    raise ValueError(f"init_from: {path}: {e}") from None
  raise ValueError(
    f"init_from: PyTorch weights are read for {TORCHVISION + CIFAR_RESNETS}, not {model_name!r}; "
    "use a teacher .npz (python -m train.teacher)."
  )


def load_into(model: nnx.Module, path: str) -> nnx.Module:
  """`model` with every variable replaced by the teacher file's (in place; returned)."""
  arrays, _ = read(path)
  want = _named(model)
  missing, unexpected = sorted(set(want) - set(arrays)), sorted(set(arrays) - set(want))
  if missing or unexpected:
    raise ValueError(
      f"init_from: {path} does not fit this model: missing {missing[:5]}"
      f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
      f"{' ...' if len(unexpected) > 5 else ''}."
    )
  for k, v in want.items():
    if tuple(arrays[k].shape) != tuple(v.shape):
      raise ValueError(
        f"init_from: {path}: entry {k!r} has shape {tuple(arrays[k].shape)}, the model's "
        f"is {tuple(v.shape)}."
      )
  graphdef, params, rest = steps_lib.split_model(model)

  def fill(prefix, tree):
    names = list(ckpt_lib.named_leaves(tree))
    leaves, treedef = jax.tree.flatten(tree)
    new = [
      jnp.asarray(arrays[f"{prefix}/{n}"], dtype=x.dtype)
      for n, x in zip(names, leaves, strict=True)
    ]
    return jax.tree.unflatten(treedef, new)

  nnx.update(model, fill("params", params), fill("rest", rest))
  return model


def load(path: str) -> nnx.Module:
  """The kept teacher at `path` as its model (a Fashion-MNIST net: 10 classes, 1 channel,
  the `model` and `model_kwargs` its file records), every variable from the file."""
  _, meta = read(path)
  from tnn import models

  model = models.MODELS[meta["model"]](
    10, rngs=nnx.Rngs(0), in_channels=1, **meta.get("model_kwargs", {})
  )
  return load_into(model, path)


def _machine() -> str:
  cpu = ""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          cpu = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  return f"{os.cpu_count()}-core {platform.machine()} {cpu}".strip()
