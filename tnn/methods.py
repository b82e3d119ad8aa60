"""Decomposition methods: one record per method, in one registry.

A `Method` holds everything tensorial knows about one decomposition: its rank rules
(`ratio`, and where it has them `eps` and `vbmf`), its layer classes (conv and dense),
and how a weight is decomposed, distorted (DeepTwist), counted and validated under a
`LayerPlan`. `tnn.make_plan`, `tnn.compress`, `tnn.distort`, `tnn.report` and the training
CLI read only this record, so a new method is its layer class plus one `Method` given to
`register_method`, as the built-in methods at the end of this file are.

Rules return a `LayerPlan` or, for the common case, just the static ranks (a tuple), which
becomes `LayerPlan(name, ranks)`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax.numpy as jnp
import numpy as np

import decomp
from decomp.rsdtr import RING_AXES
from tnn import functional as F
from tnn import layers as L

OPTIONS = ("grid", "modes")  # the `make_plan` keywords a method's rules may take


@dataclasses.dataclass(frozen=True)
class LayerPlan:
  """One layer's decomposition, all fields static.

  Attributes:
    method: a registered method's name (`tnn.CONV_METHODS`, `tnn.methods.dense_methods()`).
    ranks: `svd`/`cp`/`mcp`: `(r,)`; `tucker2`: `(r_S, r_T)`; `tt`: `(R1, R2, R3)`; `tr`:
      `(R0, R1, R2, R3)` of the ring `(S, d_h, d_w, T)`; `tiled_svd`: `(k,)` per tile;
      m-forms as their layers take them (`tnn.layers`); a registered method its own.
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


def _ranks_hyper(lp: LayerPlan) -> tuple:
  return (lp.ranks,)


@dataclasses.dataclass(frozen=True)
class Method:
  """Everything about one decomposition method.

  Attributes:
    name: the name plans and configs use (`method="tucker2"`).
    ratio: `(weight_shape, ratio, **options) -> LayerPlan | ranks`: the plan that keeps
      about `ratio` of a weight of `weight_shape` (HWIO conv, `(in, out)` dense).
    conv, dense: the `tnn.layers.Factorized` classes for conv and dense weights (None: the
      method has none). A layer class takes `(in, out[, kernel_size], *hyper(lp))`.
    eps: `(weights, eps, **options) -> [LayerPlan | ranks]`: plans at relative error
      `eps`, for a list of same-method weights (numpy, float32) at once, so a rule can
      search same-shape kernels together (RSDTR does); None: no eps rule.
    vbmf: `(weight) -> LayerPlan | ranks`: ranks by VBMF; None: no VBMF rule.
    options: which of `make_plan`'s `grid=` and `modes=` the rules take.
    hyper: `(LayerPlan) -> tuple`: the layer class's hyper-parameter arguments (default
      `(lp.ranks,)`).
    targets: the weights the method applies to, a subset of `("conv", "dense")`; default
      the ones it has a layer class for (a distortion-only method names them).
    decompose: `(weight, lp) -> params` overriding the layer kind's decomposition.
    distort: `(weight, lp) -> weight` overriding `reconstruct(decompose(weight))`.
    params: `(lp, weight_shape) -> int` overriding the count of the layer's factors.
    validate: `(lp, weight_shape) -> None` overriding the layer's `check_hyper`; raises
      `ValueError` for ranks the method cannot reach.
  """

  name: str
  ratio: Callable
  conv: type | None = None
  dense: type | None = None
  eps: Callable | None = None
  vbmf: Callable | None = None
  options: tuple = ()
  hyper: Callable = _ranks_hyper
  targets: tuple = ()
  decompose: Callable | None = None
  distort: Callable | None = None
  params: Callable | None = None
  validate: Callable | None = None

  def __post_init__(self):
    if not self.targets:
      t = ("conv",) * (self.conv is not None) + ("dense",) * (self.dense is not None)
      object.__setattr__(self, "targets", t)

  # --- what the planner, the converter and the report call -------------------------------

  def plan(self, out) -> LayerPlan:
    """A rule's output as a `LayerPlan` of this method."""
    if isinstance(out, LayerPlan):
      return out
    ranks = tuple(int(r) for r in (out if isinstance(out, (tuple, list)) else (out,)))
    return LayerPlan(self.name, ranks)

  def ratio_plan(self, weight_shape, ratio: float, **options) -> LayerPlan:
    return self.plan(self.ratio(tuple(weight_shape), ratio, **self._options(options)))

  def require(self, rule: str) -> None:
    """`ValueError` naming the methods that have `rule` ("eps" or "vbmf") if this one has not."""
    if getattr(self, rule) is not None:
      return
    having = [m.name for m in METHODS.values() if getattr(m, rule) is not None]
    if rule == "eps":
      raise ValueError(f"eps= is supported for methods {', '.join(having)}; got {self.name!r}.")
    raise ValueError(
      f"rule='vbmf' goes with method {' or '.join(map(repr, having))}, got {self.name!r}."
    )

  def eps_plans(self, weights, eps: float, **options) -> list:
    self.require("eps")
    return [self.plan(o) for o in self.eps(list(weights), eps, **self._options(options))]

  def vbmf_plan(self, weight) -> LayerPlan:
    self.require("vbmf")
    return self.plan(self.vbmf(weight))

  def layer_class(self, conv: bool = True) -> type:
    cls = self.conv if conv else self.dense
    if cls is None:
      others = [m.name for m in METHODS.values() if (m.conv if conv else m.dense) is not None]
      raise ValueError(
        f"method {self.name!r} has no factorized {'conv' if conv else 'dense'} layer"
        f"{' (it is a DeepTwist distortion only)' if self.distort else ''}; layers exist "
        f"for {sorted(others)}."
      )
    return cls

  def layer_hyper(self, lp: LayerPlan, weight_shape) -> tuple:
    """`(layer class, static hyper)` of the layer `lp` describes for this weight shape."""
    conv = len(weight_shape) == 4
    cls = self.layer_class(conv)
    shape_args = (tuple(weight_shape[:2]),) if conv else ()
    return cls, cls.check_hyper(weight_shape[-2], weight_shape[-1], *shape_args, *self.hyper(lp))

  def check(self, lp: LayerPlan, weight_shape) -> None:
    if self.validate is not None:
      self.validate(lp, tuple(weight_shape))
    else:
      self.layer_hyper(lp, weight_shape)

  def num_params(self, lp: LayerPlan, weight_shape) -> int:
    """Numbers stored by a layer under `lp` (bias excluded)."""
    if self.params is not None:
      return int(self.params(lp, tuple(weight_shape)))
    cls, hyper = self.layer_hyper(lp, weight_shape)
    return sum(math.prod(s) for s in cls.kind.shapes(tuple(weight_shape), hyper).values())

  def decompose_weight(self, weight, lp: LayerPlan) -> dict:
    if self.decompose is not None:
      return self.decompose(weight, lp)
    cls, hyper = self.layer_hyper(lp, weight.shape)
    return cls.kind.decompose(weight, hyper)

  def distort_weight(self, weight, lp: LayerPlan):
    if self.distort is not None:
      return self.distort(weight, lp)
    cls, hyper = self.layer_hyper(lp, weight.shape)
    return cls.kind.kernel(self.decompose_weight(weight, lp), tuple(weight.shape), hyper)

  def _options(self, options) -> dict:
    return {k: v for k, v in options.items() if k in self.options}


# --- the registry -------------------------------------------------------------------------

METHODS: dict = {}


def register_method(method: Method) -> Method:
  """Adds `method` to the registry: `make_plan(model, method.name, ...)`, `compress`,
  `distort`, `report`, `plan_params` and the CLI's `method=` then take it. Built-in
  methods are registered the same way. Returns `method`."""
  if not isinstance(method, Method):
    raise ValueError(f"method: {method!r} is not a tnn.Method record.")
  if not isinstance(method.name, str) or not method.name or method.name in METHODS:
    raise ValueError(f"name: {method.name!r} is empty or taken; taken names are {names()}.")
  for field, conv in (("conv", True), ("dense", False)):
    cls = getattr(method, field)
    ok = isinstance(cls, type) and issubclass(cls, L.Factorized) and cls.conv == conv
    if cls is not None and not ok:
      raise ValueError(
        f"{field}: {cls!r} is not a tnn.layers.Factorized {'conv' if conv else 'dense'} class."
      )
  for field in ("ratio", "eps", "vbmf", "hyper", "decompose", "distort", "params", "validate"):
    f = getattr(method, field)
    if (f is not None or field in ("ratio", "hyper")) and not callable(f):
      raise ValueError(f"{field}: {f!r} is not callable.")
  if not method.targets or set(method.targets) - {"conv", "dense"}:
    raise ValueError(
      f"targets: {method.targets!r}; give a non-empty subset of ('conv', 'dense') (a method "
      "with no layer class names the weights its distortion applies to)."
    )
  if set(method.options) - set(OPTIONS):
    raise ValueError(f"options: {method.options!r}; allowed a subset of {OPTIONS}.")
  METHODS[method.name] = method
  return method


def get_method(name, arg: str = "method") -> Method:
  """The registered record of `name`; `ValueError` naming `arg` if there is none."""
  if name not in METHODS:
    raise ValueError(f"{arg}: unknown method {name!r}; allowed {names()}.")
  return METHODS[name]


def names() -> tuple:
  return tuple(METHODS)


def conv_methods() -> tuple:
  """The methods that apply to conv weights, in registration order."""
  return tuple(n for n, m in METHODS.items() if "conv" in m.targets)


def dense_methods() -> tuple:
  """The methods that apply to dense (2-way) weights."""
  return tuple(n for n, m in METHODS.items() if "dense" in m.targets)


# --- built-in methods ---------------------------------------------------------------------


def _ring(ws) -> tuple:
  return tuple(ws[a] for a in RING_AXES)


def _svd_ratio(ws, ratio):
  if len(ws) == 2:
    s, t = ws
    return (max(1, min(s, t, int(ratio * s * t // (s + t)))),)
  return (decomp.lowered_svd_rank(ws, ratio=ratio),)


def _svd_eps(weights, eps):
  for w in weights:
    if w.ndim != 4:
      raise ValueError(f"eps= for method 'svd' takes conv kernels; got a weight {w.shape}.")
  return [(decomp.lowered_svd_rank_eps(w, eps=eps),) for w in weights]


def _tt_eps(weights, eps):
  out = []
  for w in weights:
    tt = decomp.tt_svd(jnp.transpose(w, RING_AXES), eps=eps)
    out.append(tuple(c.shape[2] for c in tt.cores[:-1]))
  return out


def _tr_eps(weights, eps):
  """RSDTR: the search over shifts and splits, same-shape kernels together."""
  found = decomp.rsdtr_many(weights, eps=eps)
  return [LayerPlan("tr", tuple(r.ranks), shift=r.shift) for r in found]


def _check_ring_ranks(w_shape, ranks, shift):
  """TR-SVD from mode `shift` can reach these ranks (each within its unfolding's rank)."""
  ring = list(_ring(w_shape))
  dims = ring[shift:] + ring[:shift]
  r = list(ranks[shift:]) + list(ranks[:shift])
  if r[0] * r[1] > min(dims[0], math.prod(dims[1:])):
    raise ValueError(f"ranks: R{shift} R{(shift + 1) % 4} = {r[0] * r[1]} exceeds {dims[0]}.")
  for k in range(2, 4):
    hi = min(r[k - 1] * dims[k - 1], math.prod(dims[k:]) * r[0])
    if r[k] > hi:
      raise ValueError(f"ranks: R{(shift + k) % 4}={r[k]} exceeds {hi}; allowed [1, {hi}].")


def _ring_validate(name):
  def validate(lp, ws):
    if lp.shift not in range(4):
      raise ValueError(f"shift {lp.shift} outside [0, 3].")
    _, hyper = METHODS[name].layer_hyper(lp, ws)
    if len(ws) == 4:
      _check_ring_ranks(ws, hyper, lp.shift)

  return validate


def _tiled_grid(grid) -> tuple:
  if grid is None:
    raise ValueError("method='tiled_svd' needs grid=(g_r, g_c) (tiles of the T x S d d matrix).")
  return tuple(grid)


def _tiled_ratio(ws, ratio, grid=None):
  grid = _tiled_grid(grid)
  lowered = (ws[3], math.prod(ws[:3]))
  return LayerPlan("tiled_svd", (decomp.tiled_svd_rank(lowered, grid, ratio=ratio),), grid=grid)


def _tiled_params(lp, ws):
  g_r, g_c = lp.grid
  t, n = ws[3], math.prod(ws[:3])
  return lp.ranks[0] * (g_c * t + g_r * n)


def _tiled_validate(lp, ws):
  t, n = ws[3], math.prod(ws[:3])
  decomp.tiled_svd_rank((t, n), lp.grid, ratio=1.0)  # validates the grid
  hi = min(t // lp.grid[0], n // lp.grid[1])
  if not 1 <= lp.ranks[0] <= hi:
    raise ValueError(f"tile rank {lp.ranks[0]} outside [1, {hi}].")


def _tiled_distort(weight, lp):
  f = decomp.tiled_svd(decomp.lowered(weight), grid=lp.grid, rank=lp.ranks[0])
  return decomp.unlowered(decomp.reconstruct(f), weight.shape)


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


def _m_ratio(name):
  def ratio_rule(ws, ratio, modes=None):
    """The balanced factorization of S and T into `modes` (default 2) modes, and the
    largest uniform rank (capped per bond by what the decomposition can reach) whose
    m-form stores at most `ratio` of the weight."""
    m = modes or 2
    s, t = ws[-2], ws[-1]
    in_modes, out_modes = _balanced_modes(s, m), _balanced_modes(t, m)
    if in_modes is None or out_modes is None:
      raise ValueError(f"modes={m}: cannot factor S={s}, T={t} into {m} modes.")
    dims = [a * b for a, b in zip(in_modes, out_modes, strict=True)]
    if len(ws) == 4:
      dims.append(ws[0] * ws[1])
    caps = _m_rank_caps(name, dims)
    budget = ratio * math.prod(ws)

    def lp(r):
      return LayerPlan(name, tuple(min(r, c) for c in caps), in_modes=in_modes, out_modes=out_modes)

    r = 1
    while r < max(caps) and METHODS[name].num_params(lp(r + 1), ws) <= budget:
      r += 1
    return lp(r)

  return ratio_rule


def _m_hyper(lp):
  r = lp.ranks[0] if lp.method == "mcp" else lp.ranks
  return (lp.in_modes, lp.out_modes, r)


def _first_rank(lp):
  return (lp.ranks[0],)


for _m in (
  Method(
    "svd", _svd_ratio, L.SVDConv, L.SVDDense, eps=_svd_eps,
    vbmf=lambda w: (decomp.vbmf_rank(np.asarray(decomp.lowered(w))),), hyper=_first_rank,
  ),
  Method(
    "tucker2", lambda ws, r: decomp.tucker2_ranks(ws, ratio=r), L.TuckerConv,
    eps=lambda ws, e: [decomp.tucker2_ranks_eps(w, eps=e) for w in ws],
    vbmf=decomp.tucker2_ranks_vbmf,
  ),
  Method("cp", lambda ws, r: (decomp.cp_rank(ws, ratio=r),), L.CPConv, hyper=_first_rank),
  Method(
    "tt", lambda ws, r: decomp.tt_ranks(_ring(ws), ratio=r), L.TTConv, eps=_tt_eps,
    validate=_ring_validate("tt"),
  ),
  Method(
    "tr", lambda ws, r: decomp.tr_ranks(_ring(ws), ratio=r), L.TRConv, eps=_tr_eps,
    decompose=lambda w, lp: F.tr_decompose(w, lp.ranks, lp.shift),
    validate=_ring_validate("tr"),
  ),
  Method(
    "tiled_svd", _tiled_ratio, options=("grid",), targets=("conv",), distort=_tiled_distort,
    params=_tiled_params, validate=_tiled_validate,
  ),
  Method("mcp", _m_ratio("mcp"), L.MCPConv, L.CPDense, options=("modes",), hyper=_m_hyper),
  Method("mtk", _m_ratio("mtk"), L.MTKConv, L.TuckerDense, options=("modes",), hyper=_m_hyper),
  Method("mtt", _m_ratio("mtt"), L.MTTConv, L.TTDense, options=("modes",), hyper=_m_hyper),
  Method("mtr", _m_ratio("mtr"), L.MTRConv, L.TRDense, options=("modes",), hyper=_m_hyper),
):  # fmt: skip
  register_method(_m)
del _m
