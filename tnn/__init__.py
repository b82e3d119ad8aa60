"""Tensorial layers, models and dense -> factorized conversion.

`tnn.ops` (generalized tensor operations), `tnn.layers` (factorized conv and dense
layers), `tnn.models` (the papers' networks), and the plan API: `make_plan` decides every
targeted layer's decomposition and static ranks once, `compress` builds the factorized
model from it, `distort` is the DeepTwist projection of one weight, `report` counts
parameters and MACs.
"""

from tnn import layers, models, ops, weights
from tnn import plan as _plan
from tnn.plan import (
  LayerPlan,
  Plan,
  check_plan,
  compress,
  decompose,
  distort,
  factorize_random,
  layer_paths,
  make_plan,
  plan_params,
  register_method,
  report,
)
from tnn.serving import export, load_exported


def __getattr__(name: str):
  # `tnn.CONV_METHODS` is read from `tnn.plan` at each access, so it includes the methods
  # `register_method` added after this package was imported.
  if name == "CONV_METHODS":
    return _plan.CONV_METHODS
  raise AttributeError(f"module 'tnn' has no attribute {name!r}")


__all__ = [
  "CONV_METHODS",
  "LayerPlan",
  "Plan",
  "check_plan",
  "compress",
  "decompose",
  "distort",
  "export",
  "factorize_random",
  "layer_paths",
  "layers",
  "load_exported",
  "make_plan",
  "models",
  "ops",
  "plan_params",
  "register_method",
  "report",
  "weights",
]
