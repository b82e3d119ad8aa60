"""Compressed nets out: a model's inference function as serialized StableHLO (`jax.export`).

  tnn.export(model, (None, 32, 32, 3), "out/resnet20_tr", plan=plan)
  f = tnn.load_exported("out/resnet20_tr")
  logits = f(images)                      # (N, 32, 32, 3) float32 -> (N, classes)

`export` writes a folder:

- `model.stablehlo`: `jax.export.Exported.serialize()` of the eval-mode forward pass
  (BatchNorm with its running statistics), the weights baked in as constants, lowered for
  every platform in `platforms` (default cpu, cuda and tpu: one file serves all three);
- `report.json`: input shape and dtype (a `None` batch is the symbolic dimension `b`),
  platforms, parameter and MAC counts (`tnn.report`), jax version, and the SHA-256 of
  `model.stablehlo`;
- `plan.json`: the compression plan, when given.

`load_exported` checks the checksum before it deserializes, so a truncated or corrupted
file is a `ValueError` naming it, and returns `Exported.call`, a function jax can `jit`.
Serving elsewhere: any program with a jax at least as new (the serialization is versioned
and jax keeps reading older versions) loads the file with `jax.export.deserialize` and
calls it; the StableHLO inside (`Exported.mlir_module()`) is what XLA-based runtimes and
IREE take as input.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

BLOB, REPORT, PLAN = "model.stablehlo", "report.json", "plan.json"


def _sha256(b: bytes) -> str:
  return hashlib.sha256(b).hexdigest()


def exported(
  model: nnx.Module,
  input_shape: Sequence[int | None],
  *,
  platforms=("cpu", "cuda", "tpu"),
  dtype=jnp.float32,
) -> jax.export.Exported:
  """The `jax.export.Exported` of `model`'s eval-mode forward at `input_shape` (NHWC; a
  `None` batch is symbolic)."""
  if len(input_shape) != 4 or any(d is not None and d < 1 for d in input_shape):
    raise ValueError(
      f"input_shape: (N, H, W, C) with sizes >= 1 (N may be None); got {input_shape}."
    )
  graphdef, state = nnx.split(model)

  def infer(x):
    m = nnx.merge(graphdef, state, copy=True)
    m.eval()
    return m(x)

  if input_shape[0] is None:
    (b,) = jax.export.symbolic_shape("b")
    shape = (b, *input_shape[1:])
  else:
    shape = tuple(input_shape)
  return jax.export.export(jax.jit(infer), platforms=tuple(platforms))(
    jax.ShapeDtypeStruct(shape, dtype)
  )


def export(
  model: nnx.Module,
  input_shape: Sequence[int | None],
  path: str,
  *,
  platforms=("cpu", "cuda", "tpu"),
  plan=None,
) -> dict:
  """Writes `model`'s inference function to the folder `path`; returns the report."""
  from tnn.counts import report as count

  exp = exported(model, input_shape, platforms=platforms)
  blob = bytes(exp.serialize())
  counted = tuple(1 if d is None else d for d in input_shape)
  rep = count(model, (1, *counted[1:]))
  report = dict(
    input_shape=list(input_shape),
    input_dtype="float32",
    platforms=list(platforms),
    params=rep["params"],
    macs_per_image=rep["macs"],
    jax_version=jax.__version__,
    sha256=_sha256(blob),
    bytes=len(blob),
  )
  os.makedirs(path, exist_ok=True)
  tmp = os.path.join(path, f".{BLOB}.tmp")
  with open(tmp, "wb") as f:
    f.write(blob)
  os.replace(tmp, os.path.join(path, BLOB))
  with open(os.path.join(path, REPORT), "w") as f:
    json.dump(report, f, indent=1)
  if plan is not None:
    with open(os.path.join(path, PLAN), "w") as f:
      f.write(plan.to_json())
  return report


def load_exported(path: str) -> Callable:
  """The function a folder written by `export` holds (checksum verified)."""
  try:
    with open(os.path.join(path, REPORT)) as f:
      report = json.load(f)
    with open(os.path.join(path, BLOB), "rb") as f:
      blob = f.read()
  except FileNotFoundError as e:
    raise ValueError(
      f"load_exported: {path} is not an exported model ({e.filename} missing)."
    ) from None
  except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"load_exported: {path}/{REPORT} is unreadable ({e}).") from None
  if not isinstance(report, dict) or "sha256" not in report:
    raise ValueError(f"load_exported: {path}/{REPORT} is not an export report.")
  if _sha256(blob) != report["sha256"]:
    raise ValueError(
      f"load_exported: {path}/{BLOB} does not match its checksum ({len(blob)} bytes, "
      f"{report.get('bytes')} written): truncated or corrupted; export the model again."
    )
  try:
    exp = jax.export.deserialize(bytearray(blob))
  except Exception as e:  # a checksummed file that this jax cannot read
    raise ValueError(
      f"load_exported: {path}/{BLOB} cannot be read by jax {jax.__version__} ({e})."
    ) from None
  return exp.call
