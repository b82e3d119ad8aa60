"""Compressed nets out: export and reload give the same logits; lowered for cuda and tpu;
corrupt files named."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import tnn
from tests.lowering import cpu_only_calls


@pytest.fixture(scope="module")
def small():
  dense = tnn.models.resnet20(10, rngs=nnx.Rngs(0), in_channels=1)
  plan = tnn.make_plan(dense, "tr", ratio=0.2)
  return tnn.compress(dense, plan), plan


def test_export_and_reload_give_the_models_logits(small, tmp_path):
  model, plan = small
  rep = tnn.export(model, (None, 32, 32, 1), str(tmp_path / "m"), plan=plan, platforms=("cpu",))
  assert rep["params"] == tnn.report(model, (1, 32, 32, 1))["params"]
  assert json.loads((tmp_path / "m" / "plan.json").read_text()) == json.loads(plan.to_json())
  f = tnn.load_exported(str(tmp_path / "m"))
  x = jax.random.normal(jax.random.key(0), (3, 32, 32, 1), jnp.float32)
  model.eval()
  want = model(x)
  for batch in (x, x[:1]):  # the batch is symbolic
    got = jax.jit(f)(batch)
    np.testing.assert_allclose(got, want[: batch.shape[0]], rtol=1e-5, atol=1e-5)


def test_a_model_exported_for_cuda_and_tpu_lowers_here_without_cpu_calls(small, tmp_path):
  model, _ = small
  exp = tnn.serving.exported(model, (8, 32, 32, 1), platforms=("cuda", "tpu"))
  assert exp.platforms == ("cuda", "tpu")
  text = exp.mlir_module()
  assert cpu_only_calls(text) == [], cpu_only_calls(text)
  assert "stablehlo.convolution" in text


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "junk_report"])
def test_a_corrupt_export_is_a_clear_error(small, tmp_path, damage):
  model, _ = small
  d = tmp_path / "m"
  tnn.export(model, (2, 32, 32, 1), str(d), platforms=("cpu",))
  blob = d / "model.stablehlo"
  if damage == "truncate":
    blob.write_bytes(blob.read_bytes()[: blob.stat().st_size // 2])
    match = "does not match its checksum"
  elif damage == "flip":
    b = bytearray(blob.read_bytes())
    b[len(b) // 2] ^= 0xFF
    blob.write_bytes(bytes(b))
    match = "does not match its checksum"
  elif damage == "delete":
    blob.unlink()
    match = "not an exported model"
  else:
    (d / "report.json").write_text("{junk")
    match = "unreadable"
  with pytest.raises(ValueError, match=match):
    tnn.load_exported(str(d))
