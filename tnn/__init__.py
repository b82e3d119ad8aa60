"""Tensorial layers, models and dense -> factorized conversion.

`tnn.ops` (generalized tensor operations), `tnn.layers` (factorized conv and dense
layers), `tnn.models` (the papers' networks; their BatchNorm is `tnn.norm`'s),
`tnn.methods` (one `Method` record per decomposition, in a registry), and the plan API:
`make_plan` decides every targeted layer's decomposition
and static ranks once (`tnn.plan`), `compress` builds the factorized model from it and
`distort` is the DeepTwist projection of one weight (`tnn.convert`), `report` counts
parameters and MACs (`tnn.counts`), `choose_forward` / `set_forward` pick each
factorized layer's forward path by measurement (`tnn.forward`).
"""

from tnn import layers, methods, models, norm, onednn, ops, weights
from tnn.convert import compress, decompose, distort, factorize_random
from tnn.counts import report
from tnn.forward import choose_forward, set_forward
from tnn.methods import LayerPlan, Method, register_method
from tnn.plan import Plan, check_plan, layer_paths, make_plan, plan_params
from tnn.serving import export, load_exported


def __getattr__(name: str):
  # `tnn.CONV_METHODS` is read from the registry at each access, so it includes the
  # methods `register_method` added after this package was imported.
  if name == "CONV_METHODS":
    return methods.conv_methods()
  raise AttributeError(f"module 'tnn' has no attribute {name!r}")


__all__ = [
  "CONV_METHODS",
  "LayerPlan",
  "Method",
  "Plan",
  "check_plan",
  "choose_forward",
  "compress",
  "decompose",
  "distort",
  "export",
  "factorize_random",
  "layer_paths",
  "layers",
  "load_exported",
  "make_plan",
  "methods",
  "models",
  "norm",
  "onednn",
  "ops",
  "plan_params",
  "register_method",
  "report",
  "set_forward",
  "weights",
]
