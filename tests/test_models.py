"""Model zoo: published parameter counts, shapes, addressable layers, train/eval modes."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import tnn

# Published dense parameter counts (He et al. 2016; Simonyan & Zisserman 2015 (CIFAR
# variant); Zagoruyko & Komodakis 2016; torchvision for the ImageNet ResNets).
PUBLISHED = {
  "resnet20": (10, 0.27e6),
  "resnet32": (10, 0.46e6),
  "resnet56": (10, 0.85e6),
  "vgg16": (10, 14.7e6),
  "wrn28_10": (100, 36.5e6),
  "resnet18": (1000, 11.7e6),
  "resnet34": (1000, 21.8e6),
  "resnet50": (1000, 25.6e6),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_parameter_counts(name):
  classes, published = PUBLISHED[name]
  model = nnx.eval_shape(lambda: tnn.models.MODELS[name](classes, rngs=nnx.Rngs(0)))
  n = sum(math.prod(v.shape) for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
  digits = 2 if published < 1e6 else 1  # 0.27M / 14.7M: rounding of the published figure
  assert round(n / 1e6, digits) == round(published / 1e6, digits), n


@pytest.mark.parametrize(
  "name,shape", [("resnet20", (2, 32, 32, 3)), ("lenet5", (2, 28, 28, 1)), ("cnn", (2, 28, 28, 1))]
)
def test_forward_shapes_and_features(name, shape):
  in_ch = shape[-1]
  model = tnn.models.MODELS[name](10, rngs=nnx.Rngs(0), in_channels=in_ch)
  x = jax.random.normal(jax.random.key(0), shape, jnp.float32)
  model.eval()
  y = model(x)
  assert y.shape == (2, 10)
  feats = model.features(x)
  assert len(feats) == len(model.blocks) + 2
  np.testing.assert_array_equal(feats[-1], y)


def test_layers_addressable_by_path():
  model = tnn.models.resnet20(rngs=nnx.Rngs(0))
  paths = tnn.layer_paths(model)
  assert "blocks.1.layers.0.conv1" in paths
  assert paths["blocks.1.layers.0.conv1"].strides == (2, 2)
  assert "stem.conv" in paths and "head.fc" in paths
  assert len(paths) == 19 + 1  # 19 convs and the classifier


def test_train_and_eval_modes_differ_only_through_batchnorm():
  model = tnn.models.resnet20(rngs=nnx.Rngs(0))
  x = 3.0 + jax.random.normal(jax.random.key(0), (4, 16, 16, 3), jnp.float32)
  model.eval()
  before = model(x)
  model.train()
  model(x)  # updates running statistics
  model.eval()
  after = model(x)
  assert not np.allclose(before, after)
  np.testing.assert_array_equal(model(x), after)  # eval is deterministic and stateless
