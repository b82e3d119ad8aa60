"""Compression plans: which layer gets which decomposition, at which static ranks.

A `Plan` maps layer paths (`blocks.0.layers.1.conv1`) to `LayerPlan`s. It is made once,
on the host, from the dense weights by a rank rule (`make_plan`), and read by everything
that compresses: the DeepTwist distortion and the dense -> factorized conversion
(`tnn.convert`) and the report (`tnn.counts`). Data-dependent choices (eps ranks, VBMF
ranks, the RSDTR shift) happen here, so every jitted function afterwards has static
shapes. What a method does is its record in `tnn.methods`; this module only routes.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import math
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx

from tnn import layers as L
from tnn import methods
from tnn.methods import LayerPlan

__all__ = ["LayerPlan", "Plan", "check_plan", "layer_paths", "make_plan", "plan_params"]


@dataclasses.dataclass(frozen=True)
class Plan:
  """`{path: LayerPlan}`, ordered by path; a value (hashable, comparable, JSON round-trip)."""

  layers: tuple  # ((path, LayerPlan), ...)
  # ((path, weight shape), ...) of the model the plan was made for (`make_plan` records
  # them, JSON keeps them); `check_plan` refuses a model whose layers have other shapes.
  # Not part of the value: two plans with the same layers are equal.
  shapes: tuple = dataclasses.field(default=(), compare=False)

  def __post_init__(self):
    object.__setattr__(self, "layers", tuple(sorted(self.layers)))
    object.__setattr__(self, "shapes", tuple(sorted((p, tuple(s)) for p, s in self.shapes)))

  def __getitem__(self, path: str) -> LayerPlan:
    return dict(self.layers)[path]

  def __iter__(self):
    return iter(self.layers)

  def __len__(self) -> int:
    return len(self.layers)

  @property
  def paths(self) -> tuple:
    return tuple(p for p, _ in self.layers)

  def to_json(self) -> str:
    rows = {p: {k: v for k, v in dataclasses.asdict(lp).items() if v is not None} for p, lp in self}
    for p, shape in self.shapes:
      if p in rows:
        rows[p]["weight_shape"] = list(shape)
    return json.dumps(rows, indent=1, sort_keys=True)

  @classmethod
  def from_json(cls, text: str) -> Plan:
    try:
      rows = json.loads(text)
    except json.JSONDecodeError as e:
      raise ValueError(f"Plan.from_json: not JSON ({e}).") from None
    if not isinstance(rows, dict):
      raise ValueError(
        f"Plan.from_json: expected an object {{path: entry}}, got a {type(rows).__name__}."
      )
    fields = {f.name for f in dataclasses.fields(LayerPlan)} | {"weight_shape"}

    def tup(v):
      return tuple(v) if isinstance(v, list) else v

    out, shapes = [], []
    for p, d in rows.items():
      if not isinstance(d, dict):
        raise ValueError(f"Plan.from_json: entry {p!r} is a {type(d).__name__}, not an object.")
      unknown = sorted(set(d) - fields)
      if unknown:
        raise ValueError(
          f"Plan.from_json: entry {p!r} has unknown key(s) {unknown}; allowed {sorted(fields)}."
        )
      if d.get("method") not in methods.METHODS:
        raise ValueError(
          f"Plan.from_json: entry {p!r} has method {d.get('method')!r}; allowed "
          f"{sorted(methods.METHODS)}."
        )
      if "ranks" not in d:
        raise ValueError(f"Plan.from_json: entry {p!r} has no ranks.")
      shape = d.get("weight_shape")
      if shape is not None:
        shapes.append((p, tuple(shape)))
      out.append((p, LayerPlan(**{k: tup(v) for k, v in d.items() if k != "weight_shape"})))
    return cls(tuple(out), shapes=tuple(shapes))

  def summary(self) -> str:
    lines = [f"{'layer':40s} {'method':9s} ranks"]
    for p, lp in self:
      extra = f" shift={lp.shift}" if lp.method == "tr" else ""
      extra += f" grid={lp.grid}" if lp.grid else ""
      extra += f" modes={lp.in_modes}->{lp.out_modes}" if lp.in_modes else ""
      lines.append(f"{p:40s} {lp.method:9s} {lp.ranks}{extra}")
    return "\n".join(lines)


# --- layers by path ----------------------------------------------------------------------


def path_str(path) -> str:
  return ".".join(str(p) for p in path)


def layer_paths(model: nnx.Module) -> dict:
  """`{dotted path: module}` for every conv and dense layer (dense or factorized)."""
  out = {}
  for path, m in nnx.iter_modules(model):
    if isinstance(m, (nnx.Conv, nnx.Linear, L.Factorized)):
      out[path_str(path)] = m
  return out


def weight(m) -> jax.Array:
  """A layer's dense weight (a factorized layer's reconstructed kernel)."""
  return m.kernel() if isinstance(m, L.Factorized) else m.kernel[...]


def weight_shape(m) -> tuple:
  """The dense weight's shape, without reading values (works on `nnx.eval_shape` models)."""
  return m.weight_shape if isinstance(m, L.Factorized) else tuple(m.kernel.shape)


def is_conv(m) -> bool:
  return isinstance(m, nnx.Conv) or (isinstance(m, L.Factorized) and m.conv)


def _default_target(path: str, m) -> bool:
  """The papers' default: every conv with a spatial kernel, except the stem, the shortcut
  projections and the classifier."""
  parts = path.split(".")
  return (
    isinstance(m, nnx.Conv)
    and math.prod(m.kernel_size) > 1
    and parts[0] not in ("stem", "head")
    and "proj" not in parts
  )


def set_path(model, path: str, value) -> None:
  """Replaces the submodule of `model` at dotted `path` by `value`."""
  *parents, last = path.split(".")
  node = model
  for p in parents:
    node = node[int(p)] if p.isdigit() else getattr(node, p)
  if last.isdigit():
    node[int(last)] = value
  else:
    setattr(node, last, value)


# --- make_plan ------------------------------------------------------------------------------


def make_plan(
  model: nnx.Module,
  method: str = "tucker2",
  *,
  ratio: float | None = None,
  eps: float | None = None,
  rule: str | None = None,
  budget: int | None = None,
  layers: Sequence[str] | None = None,
  overrides: dict | None = None,
  grid: tuple | None = None,
  modes: int | None = None,
) -> Plan:
  """A plan for `model`'s layers.

  Args:
    method: the decomposition for every targeted layer, a registered method's name
      (`tnn.methods`; conv layers take `conv_methods()`, dense layers `dense_methods()`).
    ratio: keep this fraction of each layer's weights, in (0, 1].
    eps: relative error per layer, in (0, 1), for methods with an eps rule (svd, tucker2,
      tt; tr is the RSDTR search).
    rule: `'vbmf'`, for methods with a VBMF rule: Tucker-2 ranks by VBMF (Kim et al.
      2016), or the lowered-SVD rank by VBMF.
    budget: total parameters of the targeted layers after compression; one global ratio
      is found by bisection so that the layers together fit it.
    layers: `fnmatch` patterns of the paths to target; default the papers' (every conv
      with a spatial kernel except the stem, the shortcuts and the classifier).
    overrides: `{path: {"method": ..., "ranks": ..., "ratio": ..., "eps": ..., "shift": ...}}`
      for single layers (a given `ranks` is used as is).
    grid: `tiled_svd` tiles `(g_r, g_c)`.
    modes: m-forms: how many modes S and T are factored into (default 2, balanced).

  Exactly one of `ratio`, `eps`, `rule`, `budget`. Raises `ValueError` before any
  decomposition for an unknown method, a ratio outside (0, 1], a path that does not
  exist or a rank above a channel count.
  """
  given = {
    k: v for k, v in dict(ratio=ratio, eps=eps, rule=rule, budget=budget).items() if v is not None
  }
  if len(given) != 1:
    raise ValueError(
      f"make_plan: give exactly one of ratio, eps, rule, budget; got {sorted(given)}."
    )
  rec = methods.get_method(method)
  if ratio is not None and not 0 < ratio <= 1:
    raise ValueError(f"ratio must be in (0, 1], got {ratio}.")
  if eps is not None and not 0 < eps < 1:
    raise ValueError(f"eps must be in (0, 1), got {eps}.")
  if rule is not None and rule != "vbmf":
    raise ValueError(f"rule must be 'vbmf', got {rule!r}.")
  if eps is not None:
    rec.require("eps")
  if rule is not None:
    rec.require("vbmf")
  if budget is not None and not budget >= 1:
    raise ValueError(f"budget must be >= 1 parameter, got {budget}.")
  if modes is not None and not 1 <= modes <= 8:
    raise ValueError(f"modes must be in [1, 8], got {modes}.")

  all_layers = layer_paths(model)
  if layers is None:
    targets = [p for p, m in all_layers.items() if _default_target(p, m)]
  else:
    targets = []
    for pat in layers:
      hit = [p for p in all_layers if fnmatch.fnmatchcase(p, pat)]
      if not hit:
        raise ValueError(f"layers: {pat!r} matches no layer; layers are {sorted(all_layers)}.")
      targets += [p for p in hit if p not in targets]
  overrides = dict(overrides or {})
  for p, o in overrides.items():
    if p not in all_layers:
      raise ValueError(f"overrides: no layer at path {p!r}; layers are {sorted(all_layers)}.")
    bad = set(o) - {"method", "ranks", "ratio", "eps", "shift", "grid", "in_modes", "out_modes"}
    if bad:
      raise ValueError(f"overrides[{p!r}]: unknown keys {sorted(bad)}.")
    methods.get_method(o.get("method", method), f"overrides[{p!r}]['method']")
    if p not in targets:
      targets.append(p)
  for p in targets:
    m = all_layers[p]
    allowed = methods.conv_methods() if is_conv(m) else methods.dense_methods()
    meth = overrides.get(p, {}).get("method", method)
    if meth not in allowed:
      raise ValueError(f"layer {p!r} ({type(m).__name__}): method {meth!r} not in {allowed}.")

  shapes = {p: weight_shape(all_layers[p]) for p in targets}

  def values(paths):  # only eps and VBMF plans look at the weights
    return {p: np.asarray(weight(all_layers[p]), np.float32) for p in paths}

  opts = dict(grid=grid, modes=modes)

  def plan_for(p, meth, r):
    return methods.get_method(meth).ratio_plan(shapes[p], r, **opts)

  plans = {}
  plain = [p for p in targets if p not in overrides]
  if ratio is not None:
    plans = {p: plan_for(p, method, ratio) for p in plain}
  elif budget is not None:
    plans = _budget_plans(plain, method, budget, plan_for, shapes)
  elif eps is not None:
    plans = _eps_plans(rec, plain, values(plain), eps, opts)
  else:
    plans = {p: rec.vbmf_plan(w) for p, w in values(plain).items()}
  for p, o in overrides.items():
    meth = o.get("method", method)
    if "ranks" in o:
      r = o["ranks"]
      plans[p] = LayerPlan(
        meth,
        tuple(r) if isinstance(r, (tuple, list)) else (r,),
        shift=o.get("shift", 0),
        grid=tuple(o["grid"]) if o.get("grid") else (tuple(grid) if grid else None),
        in_modes=tuple(o["in_modes"]) if o.get("in_modes") else None,
        out_modes=tuple(o["out_modes"]) if o.get("out_modes") else None,
      )
    elif "eps" in o:
      plans[p] = _eps_plans(methods.get_method(meth), [p], values([p]), o["eps"], opts)[p]
    else:
      plans[p] = plan_for(p, meth, o.get("ratio", ratio if ratio is not None else 0.25))
  plan = Plan(tuple(plans.items()), shapes=tuple((p, weight_shape(all_layers[p])) for p in plans))
  check_plan(plan, model)
  return plan


def _eps_plans(rec, paths, weights, eps, opts) -> dict:
  """The eps rule of `rec` for several layers at once (RSDTR searches same-shape kernels
  together)."""
  found = rec.eps_plans([weights[p] for p in paths], eps, **opts)
  return dict(zip(paths, found, strict=True))


def _budget_plans(paths, method, budget, plan_for, shapes) -> dict:
  def total(r):
    return sum(plan_params(plan_for(p, method, r), shapes[p]) for p in paths)

  if total(1e-6) > budget:
    raise ValueError(f"budget={budget} is below the smallest plan ({total(1e-6)} parameters).")
  lo, hi = 1e-6, 1.0
  for _ in range(40):
    mid = (lo + hi) / 2
    lo, hi = (mid, hi) if total(mid) <= budget else (lo, mid)
  return {p: plan_for(p, method, lo) for p in paths}


def plan_params(lp: LayerPlan, weight_shape) -> int:
  """Numbers stored by a layer under `lp` (bias excluded)."""
  return methods.get_method(lp.method).num_params(lp, weight_shape)


def check_plan(plan: Plan, model: nnx.Module) -> None:
  """`ValueError` if a plan does not fit the model (missing path, rank out of range)."""
  all_layers = layer_paths(model)
  recorded = dict(plan.shapes)
  for p, lp in plan:
    if p not in all_layers:
      raise ValueError(f"plan: no layer at path {p!r}; layers are {sorted(all_layers)}.")
    w_shape = weight_shape(all_layers[p])
    if p in recorded and tuple(recorded[p]) != tuple(w_shape):
      raise ValueError(
        f"plan[{p!r}] was made for a weight of shape {tuple(recorded[p])}; this model's is "
        f"{tuple(w_shape)}: make the plan for this model (tnn.make_plan)."
      )
    rec = methods.get_method(lp.method)
    try:
      rec.check(lp, w_shape)
    except ValueError as e:
      raise ValueError(f"plan[{p!r}] ({lp.method}, weight {w_shape}): {e}") from None
