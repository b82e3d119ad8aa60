"""Every shipped config loads, validates and plans its model before any training."""

import importlib
import json

import jax
import pytest
from flax import nnx

import tnn
from train import run as run_lib

CASES = [
  ("demo", None),
  ("deeptwist_resnet32", None),
  ("deeptwist_resnet32", "fmnist"),
  ("rsdtr_cifar10", "resnet20"),
  ("rsdtr_cifar10", "resnet56,fmnist,eps=0.5"),
  ("tnn_resnet32", "0.05,mcp"),
  ("tnn_resnet32", "0.2,tr,fmnist"),
  ("tnn_lenet5", "fmnist"),
  ("tnn_wrn28_10", "0.05,mtt"),
  ("section4", "resnet20,cpu"),
  ("section4", "resnet32"),
  ("rsdtr_imagenet", "resnet18"),
  ("rsdtr_imagenet", "resnet34,eps=0.5"),
  ("teachers", "resnet20"),
  ("teachers", "cnn"),
  ("teachers", "lenet5"),
  ("fidelity_cnn", None),
  ("fidelity_lenet", "0.05"),
  ("fidelity_lenet", "0.2"),
  ("fidelity_resnet20", "0.1"),
  ("fidelity_resnet20", "0.2,steps=30"),
  ("demo", "pretrain"),
]


@pytest.fixture(autouse=True)
def _standard_promotion():
  with jax.numpy_dtype_promotion("standard"):
    yield


@pytest.mark.parametrize("name,arg", CASES)
def test_config_validates_and_plans(name, arg):
  mod = importlib.import_module(f"train.configs.{name}")
  c = mod.get_config(arg) if arg else mod.get_config()
  if c.get("require_init_from"):
    with pytest.raises(ValueError, match="config.init_from: this config starts from pretrained"):
      run_lib.validate(c)
    c.init_from = __file__  # any file: the weights are read at run time
  run_lib.validate(c)
  fmnist = c.dataset in ("fashion_mnist", "mnist")
  classes = {"cifar100": 100, "tfds:imagenet2012": 1000}.get(c.dataset, 10)
  build = tnn.models.MODELS[c.model]
  kw = dict(c.get("model_kwargs") or {})
  dense = nnx.eval_shape(
    lambda: build(classes, rngs=nnx.Rngs(0), in_channels=1 if fmnist else 3, **kw)
  )
  plans = run_lib.check_plans(c, dense)
  compressed = [m for m in c.methods if run_lib.method_kind(c, m) != "dense"]
  assert sorted(plans) == sorted(compressed)
  layers = tnn.layer_paths(dense)
  for m, plan in plans.items():
    assert len(plan) > 0, m
    over = json.loads(c[m].get("overrides") or "{}")  # layers given another method
    assert all(p in layers and lp.method == over.get(p, {}).get("method", c[m].method)
               for p, lp in plan), m  # fmt: skip
  if arg and "fmnist" in arg:
    assert c.dataset == "fashion_mnist" and c.pad_to in (0, 32) and not c.image_size
  if c.dataset == "tfds:imagenet2012":
    assert (c.image_size, c.eval_split, c.augment.crop_pad) == (224, "validation", 0)


def test_config_args_are_checked():
  from train.configs import rsdtr_cifar10, section4

  with pytest.raises(ValueError, match="allowed resnet20, resnet32, resnet56"):
    rsdtr_cifar10.get_config("resnet18")
  from train.configs import rsdtr_imagenet

  with pytest.raises(ValueError, match="allowed resnet18, resnet34"):
    rsdtr_imagenet.get_config("resnet50")
  with pytest.raises(ValueError, match="allowed resnet20, resnet32"):
    section4.get_config("resnet56")
