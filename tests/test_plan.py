"""make_plan / compress / report / distort."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import decomp
import tnn
from tnn import layers as L


@pytest.fixture(autouse=True)
def _standard_promotion():
  """Flax's BatchNorm calls `promote_types(dtype, float32)`, which strict promotion refuses
  for float64 models; our own code is held to strict promotion in test_layers."""
  with jax.numpy_dtype_promotion("standard"):
    yield


def _small(dtype=jnp.float64):
  """A small CNN with non-trivial BatchNorm statistics, in eval mode."""
  model = tnn.models.cnn(10, rngs=nnx.Rngs(0), widths=(4, 6, 8))
  model = jax.tree.map(lambda a: a.astype(dtype), model)
  model.train()
  model(2.0 + jax.random.normal(jax.random.key(1), (8, 12, 12, 1), dtype))
  model.eval()
  return model


X = jax.random.normal(jax.random.key(2), (3, 12, 12, 1), jnp.float64)
TARGETS = ["blocks.1.layers.0.conv", "blocks.1.layers.1.conv", "blocks.2.layers.1.conv"]
# (S, T) = (4, 6), (6, 6), (8, 8); full ranks for each method:
FULL = {
  "svd": [{"ranks": 6}, {"ranks": 6}, {"ranks": 8}],
  "tucker2": [{"ranks": (4, 6)}, {"ranks": (6, 6)}, {"ranks": (8, 8)}],
  "tt": [{"ranks": (4, 12, 6)}, {"ranks": (6, 18, 6)}, {"ranks": (8, 24, 8)}],
  "tr": [{"ranks": (1, 4, 12, 6)}, {"ranks": (2, 3, 9, 12)}, {"ranks": (2, 4, 12, 16)}],
}


@pytest.mark.parametrize("method", sorted(FULL))
def test_compress_at_full_rank_reproduces_the_dense_model(method):
  model = _small()
  overrides = {p: {"method": method, **o} for p, o in zip(TARGETS, FULL[method], strict=True)}
  plan = tnn.make_plan(model, method, ratio=0.5, layers=TARGETS, overrides=overrides)
  comp = tnn.compress(model, plan)
  for p in TARGETS:
    assert isinstance(tnn.layer_paths(comp)[p], L.Factorized)
    assert not isinstance(tnn.layer_paths(model)[p], L.Factorized)  # the original is untouched
  ref = model(X)
  np.testing.assert_allclose(comp(X), ref, atol=1e-9 * float(jnp.max(jnp.abs(ref))))


def test_compress_copies_batchnorm_statistics_and_other_layers():
  model = _small()
  comp = tnn.compress(model, tnn.make_plan(model, "tucker2", ratio=0.5))
  bn, bn2 = model.blocks[1].layers[0].bn, comp.blocks[1].layers[0].bn
  np.testing.assert_array_equal(bn.mean[...], bn2.mean[...])
  np.testing.assert_array_equal(bn.var[...], bn2.var[...])
  np.testing.assert_array_equal(model.stem.conv.kernel[...], comp.stem.conv.kernel[...])


@pytest.mark.parametrize("method", ["mcp", "tucker2"])
def test_compress_forward_reconstructed_is_the_same_net(method):
  """`forward="reconstructed"` (a speed choice) gives the same factors and the same
  outputs and gradients as the factorized pipeline, through BatchNorm and all."""
  model = _small()
  plan = tnn.make_plan(model, method, ratio=0.4)
  fac, rec = tnn.compress(model, plan), tnn.compress(model, plan, forward="reconstructed")
  for p, _ in plan:
    assert tnn.layer_paths(rec)[p].forward == "reconstructed"
    assert tnn.layer_paths(fac)[p].forward == "factorized"

  def grads(m):
    g, params, rest = nnx.split(m, nnx.Param, ...)
    return jax.value_and_grad(lambda p: jnp.sum(nnx.merge(g, p, rest)(X) ** 2))(params)

  (v1, g1), (v2, g2) = grads(fac), grads(rec)
  np.testing.assert_allclose(v2, v1, rtol=1e-10)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
    np.testing.assert_allclose(b, a, rtol=1e-8, atol=1e-10 * float(jnp.max(jnp.abs(a))))
  rand = tnn.factorize_random(model, plan, nnx.Rngs(3), forward="reconstructed")
  assert tnn.layer_paths(rand)[plan.paths[0]].forward == "reconstructed"
  with pytest.raises(ValueError, match="forward 'fast'; allowed"):
    tnn.compress(model, plan, forward="fast")
  with pytest.raises(ValueError, match="forward 'fast'; allowed"):
    tnn.factorize_random(model, plan, nnx.Rngs(3), forward="fast")


def test_compressed_layers_equal_their_plan_decomposition():
  model = _small()
  plan = tnn.make_plan(model, "tucker2", ratio=0.4)
  comp = tnn.compress(model, plan)
  for p, lp in plan:
    w = tnn.layer_paths(model)[p].kernel[...]
    np.testing.assert_allclose(tnn.layer_paths(comp)[p].kernel(), tnn.distort(w, lp), atol=1e-12)


def test_plan_is_a_value():
  model = _small()
  plan = tnn.make_plan(model, "tr", ratio=0.3)
  again = tnn.Plan.from_json(plan.to_json())
  assert again == plan and hash(again) == hash(plan)
  assert "blocks.2.layers.1.conv" in plan.summary()
  assert tnn.make_plan(model, "tr", ratio=0.3) == plan
  assert tnn.make_plan(model, "tr", ratio=0.2) != plan


@pytest.mark.parametrize("method", ["svd", "tucker2", "cp", "tt", "tr", "mtt", "mtk", "mtr", "mcp"])
def test_ratio_rule_keeps_about_the_ratio(method):
  model = _small()
  plan = tnn.make_plan(model, method, ratio=0.3)
  for p, lp in plan:
    shape = tnn.layer_paths(model)[p].kernel.shape
    assert tnn.plan_params(lp, shape) <= 0.3 * np.prod(shape) or max(lp.ranks) == 1


def test_budget_rule_fits_the_budget():
  model = tnn.models.resnet20(rngs=nnx.Rngs(0))
  plan = tnn.make_plan(model, "tucker2", budget=40_000)
  shapes = {p: m.kernel.shape for p, m in tnn.layer_paths(model).items()}
  used = sum(tnn.plan_params(lp, shapes[p]) for p, lp in plan)
  assert 0.9 * 40_000 <= used <= 40_000


def test_eps_tr_plan_is_the_rsdtr_search_and_distort_matches_it():
  model = _small()
  plan = tnn.make_plan(model, "tr", eps=0.4, layers=TARGETS[1:])
  for p, lp in plan:
    w = tnn.layer_paths(model)[p].kernel[...]
    r = decomp.rsdtr(w, eps=0.4)
    assert (lp.ranks, lp.shift) == (tuple(r.ranks), r.shift)
    np.testing.assert_allclose(tnn.distort(w, lp), decomp.reconstruct(r), atol=1e-10)
    err = jnp.linalg.norm(tnn.distort(w, lp) - w) / jnp.linalg.norm(w)
    assert float(err) <= 0.4 + 1e-9


def test_distort_is_jittable_and_vmappable():
  lp = tnn.LayerPlan("tucker2", (3, 4))
  ws = jax.random.normal(jax.random.key(0), (5, 3, 3, 6, 8), jnp.float64)
  batched = jax.jit(jax.vmap(lambda w: tnn.distort(w, lp)))(ws)
  for w, d in zip(ws, batched, strict=True):
    np.testing.assert_allclose(d, tnn.distort(w, lp), atol=1e-12)
  tiled = tnn.LayerPlan("tiled_svd", (2,), grid=(2, 3))
  d = tnn.distort(ws[0], tiled)
  f = decomp.tiled_svd(decomp.lowered(ws[0]), grid=(2, 3), rank=2)
  np.testing.assert_allclose(decomp.lowered(d), decomp.reconstruct(f), atol=1e-12)


def test_report_counts_and_ratios():
  model = tnn.models.resnet20(rngs=nnx.Rngs(0))
  rep = tnn.report(model, (1, 32, 32, 3))
  assert rep["params"] == rep["dense_params"] == 269_722
  assert rep["params_ratio"] == 1.0
  # ResNet-20 on CIFAR: about 41M multiply-adds per image (He et al. 2016 report ~41M).
  assert 40e6 < rep["macs"] < 42e6
  comp = tnn.compress(model, tnn.make_plan(model, "tucker2", ratio=0.25))
  rep2 = tnn.report(comp, (1, 32, 32, 3))
  assert rep2["dense_params"] == 269_722 and rep2["dense_macs"] == rep["macs"]
  assert rep2["params_ratio"] < 0.35 and rep2["macs_ratio"] < 0.35
  row = next(r for r in rep2["layers"] if r["path"] == "blocks.1.layers.0.conv1")
  assert row["type"] == "TuckerConv" and row["params"] < row["dense_params"]


@pytest.mark.parametrize("method", [None, "tucker2", "tr", "cp"])
def test_report_macs_match_xla_cost_analysis(method):
  model = tnn.models.resnet20(rngs=nnx.Rngs(0))
  if method:
    model = tnn.compress(model, tnn.make_plan(model, method, ratio=0.25))
  """The report's conv and dense MACs against XLA's flop count of the same layers, each
  compiled alone at the input shape it sees in the model (the whole model's count would
  add BatchNorm, ReLU and residual flops, which the report does not count)."""
  model.eval()
  shape = (1, 32, 32, 3)
  rep = tnn.report(model, shape)
  shapes = tnn.counts._input_shapes(model, shape)
  layers = tnn.layer_paths(model)
  xla = 0.0
  for row in rep["layers"]:
    graph, state = nnx.split(layers[row["path"]])
    x = jnp.ones(shapes[row["path"]], jnp.float32)
    fn = jax.jit(lambda s, x, graph=graph: nnx.merge(graph, s)(x))
    xla += fn.lower(state, x).compile().cost_analysis()["flops"] / 2
  assert xla == pytest.approx(rep["macs"], rel=0.10)


@pytest.mark.parametrize(
  "kwargs,match",
  [
    (dict(method="qr", ratio=0.5), "unknown method 'qr'"),
    (dict(method="tucker2", ratio=0.0), r"ratio must be in \(0, 1\]"),
    (dict(method="tucker2", ratio=1.5), r"ratio must be in \(0, 1\]"),
    (dict(method="tucker2", ratio=0.5, eps=0.1), "exactly one of"),
    (dict(method="tucker2", eps=1.0), r"eps must be in \(0, 1\)"),
    (dict(method="tucker2", ratio=0.5, layers=["blocks.9.*"]), "matches no layer"),
    (dict(method="tucker2", ratio=0.5, overrides={"blocks.7.conv": {}}), "no layer at path"),
    (
      dict(method="tucker2", ratio=0.5, overrides={"blocks.1.layers.0.conv": {"ranks": (9, 2)}}),
      r"r_S\)=9 exceeds 4",
    ),
    (
      dict(method="tr", ratio=0.5, overrides={"blocks.1.layers.0.conv": {"ranks": (3, 3, 2, 2)}}),
      "exceeds",
    ),
    (dict(method="cp", eps=0.3), "eps= is supported"),
    (dict(method="cp", rule="vbmf"), "rule='vbmf' goes with"),
    (dict(method="tiled_svd", ratio=0.5), "needs grid"),
    (
      dict(method="svd", ratio=0.5, layers=["head.fc"], overrides={"head.fc": {"method": "tr"}}),
      "not in",
    ),
  ],
)
def test_bad_plans_fail_before_any_work(kwargs, match):
  with pytest.raises(ValueError, match=match):
    tnn.make_plan(_small(), **kwargs)


def test_dense_layers_can_be_planned():
  model = tnn.models.lenet5(rngs=nnx.Rngs(0))
  plan = tnn.make_plan(model, "mtt", ratio=0.2, layers=["head.layers.0"])
  comp = tnn.compress(model, plan)
  assert isinstance(comp.head.layers[0], L.TTDense)
  assert comp(jnp.ones((1, 28, 28, 1))).shape == (1, 10)


def test_register_method_refuses_bad_registrations():
  M = tnn.Method
  with pytest.raises(ValueError, match="empty or taken"):
    tnn.register_method(M("tucker2", lambda ws, r: (1, 1), tnn.layers.TuckerConv))
  with pytest.raises(ValueError, match="not a tnn.layers.Factorized conv class"):
    tnn.register_method(M("mine", lambda ws, r: (1,), tnn.layers.SVDDense))
  with pytest.raises(ValueError, match="not a tnn.layers.Factorized dense class"):
    tnn.register_method(M("mine", lambda ws, r: (1,), dense=tnn.layers.SVDConv))
  with pytest.raises(ValueError, match="ratio: 3 is not callable"):
    tnn.register_method(M("mine", 3, tnn.layers.TuckerConv))
  with pytest.raises(ValueError, match="eps: 0.1 is not callable"):
    tnn.register_method(M("mine", lambda ws, r: (1,), tnn.layers.TuckerConv, eps=0.1))
  with pytest.raises(ValueError, match="targets: \\(\\)"):
    tnn.register_method(M("mine", lambda ws, r: (1,)))  # no layer, no targets
  with pytest.raises(ValueError, match="not a tnn.Method record"):
    tnn.register_method("mine")
  assert "mine" not in tnn.CONV_METHODS and "mine" not in tnn.methods.METHODS
