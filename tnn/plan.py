"""Compression plans: which layer gets which decomposition, at which static ranks.

A `Plan` maps layer paths (`blocks.0.layers.1.conv1`) to `LayerPlan`s. It is made once,
on the host, from the dense weights by a rank rule (`make_plan`), and read by everything
that compresses: the DeepTwist distortion (`distort`), the dense -> factorized conversion
(`compress`) and the report (`report`). Data-dependent choices (eps ranks, VBMF ranks, the
RSDTR shift) happen here, so every jitted function afterwards has static shapes.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import decomp
from decomp.rsdtr import RING_AXES
from tnn import functional as F
from tnn import layers as L
from tnn import ops

CONV_METHODS = ("svd", "tucker2", "cp", "tt", "tr", "tiled_svd", "mcp", "mtk", "mtt", "mtr")
DENSE_METHODS = ("svd", "mcp", "mtk", "mtt", "mtr")
_M_FORM = {"mcp": "cp", "mtk": "tk", "mtt": "tt", "mtr": "tr"}
_CONV_CLASS = {
  "svd": L.SVDConv,
  "tucker2": L.TuckerConv,
  "cp": L.CPConv,
  "tt": L.TTConv,
  "tr": L.TRConv,
  "mcp": L.MCPConv,
  "mtk": L.MTKConv,
  "mtt": L.MTTConv,
  "mtr": L.MTRConv,
}
_DENSE_CLASS = {
  "svd": L.SVDDense,
  "mcp": L.CPDense,
  "mtk": L.TuckerDense,
  "mtt": L.TTDense,
  "mtr": L.TRDense,
}


_RATIO_RULES: dict = {}  # registered methods: name -> ratio_ranks(weight_shape, ratio)


def register_method(name: str, layer_cls: type, ratio_ranks) -> None:
  """Makes a new conv layer kind plannable: `make_plan(model, name, ratio=... | budget=...)`,
  `compress`, `distort` (DeepTwist), `report` and `plan_params` then work with it.

  Args:
    name: the method name plans use; must be new.
    layer_cls: a `tnn.layers.Factorized` conv class (`conv = True`) whose hyper-parameter
      argument is `ranks` (a tuple), as `TuckerConv(in_features, out_features, kernel_size,
      ranks)`.
    ratio_ranks: `(weight_shape HWIO, ratio) -> ranks` keeping about `ratio` of the weights.
  """
  global CONV_METHODS
  if not isinstance(name, str) or not name or name in CONV_METHODS:
    raise ValueError(f"name: {name!r} is empty or taken; taken names are {CONV_METHODS}.")
  if not (isinstance(layer_cls, type) and issubclass(layer_cls, L.Factorized) and layer_cls.conv):
    raise ValueError(f"layer_cls: {layer_cls!r} is not a tnn.layers.Factorized conv class.")
  if not callable(ratio_ranks):
    raise ValueError(f"ratio_ranks: {ratio_ranks!r} is not callable.")
  CONV_METHODS += (name,)
  _CONV_CLASS[name] = layer_cls
  _RATIO_RULES[name] = ratio_ranks


@dataclasses.dataclass(frozen=True)
class LayerPlan:
  """One layer's decomposition, all fields static.

  Attributes:
    method: one of `CONV_METHODS` (conv) or `DENSE_METHODS` (dense).
    ranks: `svd`/`cp`/`mcp`: `(r,)`; `tucker2`: `(r_S, r_T)`; `tt`: `(R1, R2, R3)`; `tr`:
      `(R0, R1, R2, R3)` of the ring `(S, d_h, d_w, T)`; `tiled_svd`: `(k,)` per tile;
      m-forms as their layers take them (`tnn.layers`).
    shift: `tr` only: the mode of the ring the TR-SVD sweep starts at (RSDTR's winner).
    grid: `tiled_svd` only: `(g_r, g_c)` tiles of the lowered matrix `(T, S d_h d_w)`.
    in_modes, out_modes: m-forms only: the factorizations of S and T.
  """

  method: str
  ranks: tuple
  shift: int = 0
  grid: tuple | None = None
  in_modes: tuple | None = None
  out_modes: tuple | None = None

  def hyper_args(self) -> tuple:
    """The layer class's hyper-parameter arguments."""
    if self.method in _M_FORM:
      r = self.ranks[0] if self.method == "mcp" else self.ranks
      return (self.in_modes, self.out_modes, r)
    if self.method in ("svd", "cp"):
      return (self.ranks[0],)
    return (self.ranks,)


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
      if d.get("method") not in CONV_METHODS + DENSE_METHODS:
        raise ValueError(
          f"Plan.from_json: entry {p!r} has method {d.get('method')!r}; allowed "
          f"{sorted(set(CONV_METHODS + DENSE_METHODS))}."
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


def _path_str(path) -> str:
  return ".".join(str(p) for p in path)


def layer_paths(model: nnx.Module) -> dict:
  """`{dotted path: module}` for every conv and dense layer (dense or factorized)."""
  out = {}
  for path, m in nnx.iter_modules(model):
    if isinstance(m, (nnx.Conv, nnx.Linear, L.Factorized)):
      out[_path_str(path)] = m
  return out


def _weight(m) -> jax.Array:
  return m.kernel() if isinstance(m, L.Factorized) else m.kernel[...]


def _weight_shape(m) -> tuple:
  """The dense weight's shape, without reading values (works on `nnx.eval_shape` models)."""
  return m.weight_shape if isinstance(m, L.Factorized) else tuple(m.kernel.shape)


def _is_conv(m) -> bool:
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


# --- rank rules ---------------------------------------------------------------------------


def _balanced_modes(n: int, m: int) -> tuple:
  """`n` as `m` integer factors as equal as possible (largest first)."""
  best = None

  def rec(n, m, lo, acc):
    nonlocal best
    if m == 1:
      if n >= lo:
        cand = tuple(sorted((*acc, n), reverse=True))
        if best is None or max(cand) / min(cand) < max(best) / min(best):
          best = cand
      return
    for d in range(lo, math.isqrt(n) + 1 if m == 2 else n + 1):
      if n % d == 0:
        rec(n // d, m - 1, d, (*acc, d))

  rec(n, m, 1, ())
  return best


def _layer_hyper(lp: LayerPlan, weight_shape) -> tuple:
  """`(layer class, static hyper)` of the layer `lp` describes for a weight of this shape."""
  conv = len(weight_shape) == 4
  cls = (_CONV_CLASS if conv else _DENSE_CLASS)[lp.method]
  shape_args = (tuple(weight_shape[:2]),) if conv else ()
  return cls, cls.check_hyper(weight_shape[-2], weight_shape[-1], *shape_args, *lp.hyper_args())


def _m_params(lp: LayerPlan, weight_shape) -> int:
  cls, hyper = _layer_hyper(lp, weight_shape)
  return sum(math.prod(s) for s in cls.kind.shapes(tuple(weight_shape), hyper).values())


def _m_rank_caps(method, dims) -> list:
  """Per-rank maxima that the m-form's decomposition of `dims` can reach."""
  n = len(dims)
  if method == "mtk":
    return [min(d, math.prod(dims) // d) for d in dims]
  if method == "mtt":
    return [min(math.prod(dims[:k]), math.prod(dims[k:])) for k in range(1, n)]
  if method == "mtr":
    r = math.isqrt(dims[0])
    return list(decomp.tr_max_ranks(dims, r, r))
  return [10**9]


def _m_ratio_ranks(method, weight_shape, in_modes, out_modes, ratio) -> LayerPlan:
  """The largest uniform rank (capped per bond by what the decomposition can reach) whose
  m-form stores at most `ratio` of the weight."""
  dims = [s * t for s, t in zip(in_modes, out_modes, strict=True)]
  if len(weight_shape) == 4:
    dims.append(weight_shape[0] * weight_shape[1])
  caps = _m_rank_caps(method, dims)
  budget = ratio * math.prod(weight_shape)

  def lp(r):
    return LayerPlan(method, tuple(min(r, c) for c in caps), in_modes=in_modes, out_modes=out_modes)

  r = 1
  while r < max(caps) and _m_params(lp(r + 1), weight_shape) <= budget:
    r += 1
  return lp(r)


def _ratio_plan(method, w_shape, ratio, grid, modes) -> LayerPlan:
  if method in _M_FORM:
    m = modes or 2
    s, t = w_shape[-2], w_shape[-1]
    in_modes, out_modes = _balanced_modes(s, m), _balanced_modes(t, m)
    if in_modes is None or out_modes is None:
      raise ValueError(f"modes={m}: cannot factor S={s}, T={t} into {m} modes.")
    return _m_ratio_ranks(method, w_shape, in_modes, out_modes, ratio)
  if len(w_shape) == 2:  # dense svd
    s, t = w_shape
    return LayerPlan("svd", (max(1, min(s, t, int(ratio * s * t // (s + t)))),))
  ring = tuple(w_shape[a] for a in RING_AXES)
  if method == "svd":
    return LayerPlan("svd", (decomp.lowered_svd_rank(w_shape, ratio=ratio),))
  if method == "tucker2":
    return LayerPlan("tucker2", decomp.tucker2_ranks(w_shape, ratio=ratio))
  if method == "cp":
    return LayerPlan("cp", (decomp.cp_rank(w_shape, ratio=ratio),))
  if method == "tt":
    return LayerPlan("tt", decomp.tt_ranks(ring, ratio=ratio))
  if method == "tr":
    return LayerPlan("tr", decomp.tr_ranks(ring, ratio=ratio))
  if method == "tiled_svd":
    grid = _tiled_grid(w_shape, grid)
    lowered = (w_shape[3], math.prod(w_shape[:3]))
    return LayerPlan("tiled_svd", (decomp.tiled_svd_rank(lowered, grid, ratio=ratio),), grid=grid)
  if method in _RATIO_RULES:
    return LayerPlan(method, tuple(int(r) for r in _RATIO_RULES[method](tuple(w_shape), ratio)))
  raise AssertionError(method)


def ratio_layer_plan(method: str, weight_shape, ratio: float, *, grid=None, modes=None):
  """The `LayerPlan` that `make_plan(..., ratio=ratio)` gives one weight of `weight_shape`
  (HWIO conv or `(in, out)` dense) under `method` (`grid`: tiled SVD; `modes`: m-forms)."""
  return _ratio_plan(method, tuple(weight_shape), ratio, grid, modes)


def layer_class(method: str, conv: bool = True) -> type:
  """The `tnn.layers.Factorized` class of `method` for a conv (or a dense) weight; its
  hyper-parameters are `LayerPlan.hyper_args()`."""
  table = _CONV_CLASS if conv else _DENSE_CLASS
  if method not in table:
    raise ValueError(f"method: {method!r} has no {'conv' if conv else 'dense'} layer; "
                     f"allowed {sorted(table)}.")  # fmt: skip
  return table[method]


def _tiled_grid(w_shape, grid) -> tuple:
  if grid is None:
    raise ValueError("method='tiled_svd' needs grid=(g_r, g_c) (tiles of the T x S d d matrix).")
  return tuple(grid)


def _eps_plans(method, paths, weights, eps) -> dict:
  """eps rule for several layers; RSDTR searches same-shape kernels together."""
  if method == "tr":
    found = decomp.rsdtr_many([weights[p] for p in paths], eps=eps)
    return {
      p: LayerPlan("tr", tuple(r.ranks), shift=r.shift) for p, r in zip(paths, found, strict=True)
    }
  out = {}
  for p in paths:
    w = weights[p]
    if method == "svd" and w.ndim == 4:
      out[p] = LayerPlan("svd", (decomp.lowered_svd_rank_eps(w, eps=eps),))
    elif method == "tucker2":
      out[p] = LayerPlan("tucker2", decomp.tucker2_ranks_eps(w, eps=eps))
    elif method == "tt":
      tt = decomp.tt_svd(jnp.transpose(w, RING_AXES), eps=eps)
      out[p] = LayerPlan("tt", tuple(c.shape[2] for c in tt.cores[:-1]))
    else:
      raise ValueError(f"eps= is supported for methods svd, tucker2, tt, tr; got {method!r}.")
  return out


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
    method: the decomposition for every targeted layer (`CONV_METHODS`; dense layers
      take `DENSE_METHODS`).
    ratio: keep this fraction of each layer's weights, in (0, 1].
    eps: relative error per layer, in (0, 1) (svd, tucker2, tt; tr is the RSDTR search).
    rule: `'vbmf'`: Tucker-2 ranks by VBMF (Kim et al. 2016), or lowered-SVD rank by VBMF.
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
  _check_method(method, "method")
  if ratio is not None and not 0 < ratio <= 1:
    raise ValueError(f"ratio must be in (0, 1], got {ratio}.")
  if eps is not None and not 0 < eps < 1:
    raise ValueError(f"eps must be in (0, 1), got {eps}.")
  if rule is not None and rule != "vbmf":
    raise ValueError(f"rule must be 'vbmf', got {rule!r}.")
  if rule == "vbmf" and method not in ("tucker2", "svd"):
    raise ValueError(f"rule='vbmf' goes with method 'tucker2' or 'svd', got {method!r}.")
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
    _check_method(o.get("method", method), f"overrides[{p!r}]['method']")
    if p not in targets:
      targets.append(p)
  for p in targets:
    m = all_layers[p]
    allowed = CONV_METHODS if _is_conv(m) else DENSE_METHODS
    meth = overrides.get(p, {}).get("method", method)
    if meth not in allowed:
      raise ValueError(f"layer {p!r} ({type(m).__name__}): method {meth!r} not in {allowed}.")

  shapes = {p: _weight_shape(all_layers[p]) for p in targets}

  def values(paths):  # only eps and VBMF plans look at the weights
    return {p: np.asarray(_weight(all_layers[p]), np.float32) for p in paths}

  def plan_for(p, meth, r):
    return _ratio_plan(meth, shapes[p], r, grid, modes)

  plans = {}
  plain = [p for p in targets if p not in overrides]
  if ratio is not None:
    plans = {p: plan_for(p, method, ratio) for p in plain}
  elif budget is not None:
    plans = _budget_plans(plain, method, budget, plan_for, shapes)
  elif eps is not None:
    plans = _eps_plans(method, plain, values(plain), eps)
  else:
    for p, w in values(plain).items():
      if method == "tucker2":
        plans[p] = LayerPlan("tucker2", decomp.tucker2_ranks_vbmf(w))
      else:
        plans[p] = LayerPlan("svd", (decomp.vbmf_rank(np.asarray(decomp.lowered(w))),))
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
      plans[p] = _eps_plans(meth, [p], values([p]), o["eps"])[p]
    else:
      plans[p] = plan_for(p, meth, o.get("ratio", ratio if ratio is not None else 0.25))
  plan = Plan(tuple(plans.items()), shapes=tuple((p, _weight_shape(all_layers[p])) for p in plans))
  check_plan(plan, model)
  return plan


def _check_method(method, name):
  if method not in CONV_METHODS:
    raise ValueError(f"{name}: unknown method {method!r}; allowed {CONV_METHODS}.")


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
  if lp.method == "tiled_svd":
    g_r, g_c = lp.grid
    t, n = weight_shape[3], math.prod(weight_shape[:3])
    return lp.ranks[0] * (g_c * t + g_r * n)
  return _m_params(lp, weight_shape)


def check_plan(plan: Plan, model: nnx.Module) -> None:
  """`ValueError` if a plan does not fit the model (missing path, rank out of range)."""
  all_layers = layer_paths(model)
  recorded = dict(plan.shapes)
  for p, lp in plan:
    if p not in all_layers:
      raise ValueError(f"plan: no layer at path {p!r}; layers are {sorted(all_layers)}.")
    m = all_layers[p]
    w_shape = _weight_shape(m)
    if p in recorded and tuple(recorded[p]) != tuple(w_shape):
      raise ValueError(
        f"plan[{p!r}] was made for a weight of shape {tuple(recorded[p])}; this model's is "
        f"{tuple(w_shape)}: make the plan for this model (tnn.make_plan)."
      )
    if lp.method == "tiled_svd":
      t, n = w_shape[3], math.prod(w_shape[:3])
      decomp.tiled_svd_rank((t, n), lp.grid, ratio=1.0)  # validates the grid
      hi = min(t // lp.grid[0], n // lp.grid[1])
      if not 1 <= lp.ranks[0] <= hi:
        raise ValueError(f"plan[{p!r}]: tile rank {lp.ranks[0]} outside [1, {hi}].")
      continue
    if lp.method == "tr" and lp.shift not in range(4):
      raise ValueError(f"plan[{p!r}]: shift {lp.shift} outside [0, 3].")
    try:
      _, hyper = _layer_hyper(lp, w_shape)
      if len(w_shape) == 4 and lp.method in ("tt", "tr"):
        _check_ring_ranks(w_shape, hyper, lp.shift)
    except ValueError as e:
      raise ValueError(f"plan[{p!r}] ({lp.method}, weight {w_shape}): {e}") from None


def _check_ring_ranks(w_shape, ranks, shift):
  """TR-SVD from mode `shift` can reach these ranks (each within its unfolding's rank)."""
  ring = [w_shape[a] for a in RING_AXES]
  dims = ring[shift:] + ring[:shift]
  r = list(ranks[shift:]) + list(ranks[:shift])
  if r[0] * r[1] > min(dims[0], math.prod(dims[1:])):
    raise ValueError(f"ranks: R{shift} R{(shift + 1) % 4} = {r[0] * r[1]} exceeds {dims[0]}.")
  for k in range(2, 4):
    hi = min(r[k - 1] * dims[k - 1], math.prod(dims[k:]) * r[0])
    if r[k] > hi:
      raise ValueError(f"ranks: R{(shift + k) % 4}={r[k]} exceeds {hi}; allowed [1, {hi}].")


# --- decompose / distort: static, jittable, vmappable ----------------------------------


def decompose(weight: jax.Array, lp: LayerPlan) -> dict:
  """The factor params of the layer `lp` describes, from a dense weight (static ranks)."""
  if lp.method == "tiled_svd":
    raise ValueError("tiled_svd has no factorized layer here; use distort() (DeepTwist).")
  if lp.method == "tr":
    return _tr_decompose_shift(weight, lp.ranks, lp.shift)
  cls, hyper = _layer_hyper(lp, weight.shape)
  return cls.kind.decompose(weight, hyper)


def _tr_decompose_shift(kernel, ranks, shift):
  """TR-SVD of the ring `(S, d_h, d_w, T)` started at mode `shift`, cores rotated back."""
  ring = jnp.transpose(kernel, RING_AXES)
  order = [(shift + k) % 4 for k in range(4)]
  rot = jnp.transpose(ring, order)
  tr = decomp.tr_svd(rot, ranks=tuple(ranks[i] for i in order))
  cores = [None] * 4
  for k, i in enumerate(order):
    cores[i] = tr.cores[k]
  return F.tr_params(decomp.TR(tuple(cores)))


def distort(weight: jax.Array, lp: LayerPlan) -> jax.Array:
  """`reconstruct(decompose(weight))`: the DeepTwist distortion of one weight."""
  if lp.method == "tiled_svd":
    lowered = decomp.lowered(weight)
    f = decomp.tiled_svd(lowered, grid=lp.grid, rank=lp.ranks[0])
    return decomp.unlowered(decomp.reconstruct(f), weight.shape)
  cls, hyper = _layer_hyper(lp, weight.shape)
  return cls.kind.kernel(decompose(weight, lp), tuple(weight.shape), hyper)


# --- compress ----------------------------------------------------------------------------


def _set_path(model, path: str, value) -> None:
  *parents, last = path.split(".")
  node = model
  for p in parents:
    node = node[int(p)] if p.isdigit() else getattr(node, p)
  if last.isdigit():
    node[int(last)] = value
  else:
    setattr(node, last, value)


def compress(model: nnx.Module, plan: Plan, *, forward: str = "factorized") -> nnx.Module:
  """A copy of `model` whose planned layers are factorized, initialised from the
  decomposition of their dense weights; everything else (BatchNorm statistics included)
  is copied. Same-shape weights with the same plan are decomposed together (`vmap`).
  `forward`: the new layers' path (`tnn.layers.Factorized`; speed only)."""
  _check_forward(forward)
  check_plan(plan, model)
  new = nnx.clone(model)
  layers = layer_paths(new)
  groups: dict = {}
  for p, lp in plan:
    if lp.method == "tiled_svd":
      raise ValueError(f"plan[{p!r}]: tiled_svd is a DeepTwist distortion; it has no layer.")
    groups.setdefault((tuple(_weight(layers[p]).shape), lp), []).append(p)
  for (_, lp), paths in groups.items():
    stack = jnp.stack([_weight(layers[p]) for p in paths])
    params = jax.vmap(lambda w, lp=lp: decompose(w, lp))(stack)
    for i, p in enumerate(paths):
      m = layers[p]
      bias = None if getattr(m, "bias", None) is None else m.bias[...]
      params_i = {k: v[i] for k, v in params.items()}
      _set_path(new, p, _factorized(m, lp, params=params_i, bias=bias, forward=forward))
  return new


def _check_forward(forward):
  if forward not in L.FORWARDS:
    raise ValueError(f"forward {forward!r}; allowed {L.FORWARDS}.")


def _factorized(m, lp: LayerPlan, **init) -> L.Factorized:
  """The factorized layer that replaces `m` under `lp`, with `m`'s strides, padding, bias
  flag and dtype; `init` is `params=, bias=` (from a decomposition) or `rngs=` (random),
  and `forward=`."""
  w = _weight(m)
  common = dict(use_bias=getattr(m, "bias", None) is not None, param_dtype=w.dtype, **init)
  if w.ndim == 4:
    cls = _CONV_CLASS.get(lp.method)
    if cls is None:
      raise ValueError(
        f"method {lp.method!r} has no factorized conv layer (it is a DeepTwist distortion "
        f"only); layers exist for {sorted(_CONV_CLASS)}."
      )
    shape = (w.shape[2], w.shape[3], tuple(w.shape[:2]))
    return cls(*shape, *lp.hyper_args(), strides=m.strides, padding=m.padding, **common)
  return _DENSE_CLASS[lp.method](w.shape[0], w.shape[1], *lp.hyper_args(), **common)


# --- report ---------------------------------------------------------------------------------


class _Probe(nnx.Module):
  """Stands in for one layer during `_input_shapes`' abstract forward pass: records the
  shape of its input, then calls the layer."""

  def __init__(self, layer, path: str, record):
    self.layer, self.path, self.record = layer, path, record

  def __call__(self, x, *args, **kwargs):
    self.record(self.path, tuple(x.shape))
    return self.layer(x, *args, **kwargs)


def _input_shapes(model: nnx.Module, input_shape) -> dict:
  """`{path: input shape}` of every conv/dense layer, from one abstract forward pass of a
  copy of the model in which each such layer is wrapped in a `_Probe` (the model and the
  layer classes are left as they are)."""
  classes = (nnx.Conv, nnx.Linear, L.Factorized)
  graph, state = nnx.split(model)
  shapes: dict = {}

  def run(state, x):
    m = nnx.merge(graph, state)
    m.eval()
    for path, mod in list(nnx.iter_modules(m)):
      if path and isinstance(mod, classes):
        _set_path(m, _path_str(path), _Probe(mod, _path_str(path), shapes.__setitem__))
    m(x)
    return 0

  jax.eval_shape(run, state, jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32))
  return shapes


def _dense_macs(m, in_shape, w_shape) -> int:
  if len(w_shape) == 4:
    strides = m.strides if isinstance(m, L.Factorized) else _nnx_strides(m)
    padding = m.padding
    if isinstance(padding, int):
      padding = ((padding, padding), (padding, padding))
    return ops.conv_macs(in_shape, w_shape, strides=strides, padding=padding)
  return math.prod(in_shape[:-1]) * w_shape[0] * w_shape[1]


def _nnx_strides(m) -> tuple:
  s = m.strides
  return (s, s) if isinstance(s, int) else tuple(s)


def report(model: nnx.Module, input_shape: Sequence[int]) -> dict:
  """Parameters and MACs of `model` at `input_shape` (NHWC, batch included).

  Returns:
    `{"params", "macs", "dense_params", "dense_macs", "params_ratio", "macs_ratio",
    "layers": [{"path", "type", "params", "macs", "dense_params", "dense_macs"}]}`.
    `params` counts every `nnx.Param` (BatchNorm scale/bias included); `macs` the conv and
    dense layers' multiply-adds (factorized ones through their pipelines); the `dense_*`
    figures are the same model with every factorized layer replaced by its dense weight.
  """
  shapes = _input_shapes(model, input_shape)
  rows = []
  for p, m in layer_paths(model).items():
    w_shape = _weight_shape(m)
    has_bias = getattr(m, "bias", None) is not None
    dense_params = math.prod(w_shape) + (w_shape[-1] if has_bias else 0)
    dense_macs = _dense_macs(m, shapes[p], w_shape) if p in shapes else 0
    if isinstance(m, L.Factorized):
      params, macs = m.num_params(), (m.macs(shapes[p]) if p in shapes else 0)
    else:
      params, macs = dense_params, dense_macs
    rows.append(
      dict(
        path=p,
        type=type(m).__name__,
        params=params,
        macs=macs,
        dense_params=dense_params,
        dense_macs=dense_macs,
      )
    )
  total = sum(math.prod(v.shape) for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
  layer_params = sum(r["params"] for r in rows)
  dense_total = total - layer_params + sum(r["dense_params"] for r in rows)
  macs = sum(r["macs"] for r in rows)
  dense_macs = sum(r["dense_macs"] for r in rows)
  return dict(
    params=int(total),
    macs=int(macs),
    dense_params=int(dense_total),
    dense_macs=int(dense_macs),
    params_ratio=total / dense_total,
    macs_ratio=macs / dense_macs if dense_macs else 1.0,
    layers=rows,
  )


def factorize_random(
  model: nnx.Module, plan: Plan, rngs: nnx.Rngs, *, forward: str = "factorized"
) -> nnx.Module:
  """A copy of `model` whose planned layers are factorized with random (He) factors: the
  "from scratch" baseline. Everything else is copied. `forward` as in `compress`."""
  _check_forward(forward)
  check_plan(plan, model)
  new = nnx.clone(model)
  layers = layer_paths(new)
  for p, lp in plan:
    _set_path(new, p, _factorized(layers[p], lp, rngs=rngs, forward=forward))
  return new
