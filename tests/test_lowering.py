"""Every program lowers for cuda and tpu on this CPU machine, with no CPU-only call in it.

`jax.export(..., platforms=("cuda", "tpu"))` lowers a program for those backends without
the hardware. Lowered here: the jitted train step, dense and with every factorized kind;
the DeepTwist step with a distortion for every plan method; the two distillation steps;
every public decomposition; the RSDTR search's programs. No module may call a jaxlib CPU
kernel (`lapack_*`, `ducc_*`, ...). The DeepTwist steps' solver calls are counted: one
batched eigensolver (cuSOLVER `syevd`, TPU `Eigh`) per distinct kernel shape and mode.
"""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import decomp
import tnn
from tests.lowering import cpu_only_calls, custom_calls
from train import steps as steps_lib

rsdtr_lib = importlib.import_module("decomp.rsdtr")  # `decomp.rsdtr` is the function
PLATFORMS = ("cuda", "tpu")
KINDS = tnn.CONV_METHODS
SOLVERS = ("cusolver", "Eigh", "Qr", "qr", "svd", "Svd", "geqrf", "syevd", "gesvd")


@pytest.fixture(autouse=True)
def _standard_promotion():
  with jax.numpy_dtype_promotion("standard"):
    yield


def _check(exp) -> list:
  """The module's custom calls, after asserting it has no CPU-only one."""
  assert exp.platforms == PLATFORMS
  text = exp.mlir_module()
  assert cpu_only_calls(text) == [], cpu_only_calls(text)
  return custom_calls(text)


def _dense():
  return tnn.models.cnn(4, rngs=nnx.Rngs(0), in_channels=1, widths=(8, 16, 16))


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), tree)


def _batch(n=8, hw=12):
  return (jax.ShapeDtypeStruct((n, hw, hw, 1), jnp.uint8), jax.ShapeDtypeStruct((n,), jnp.int32))


def _model(kind):
  dense = _dense()
  if kind == "dense":
    return dense, None
  plan = _plan(dense, kind)
  return tnn.factorize_random(dense, plan, nnx.Rngs(1)), plan


def _plan(dense, kind):
  extra = {"grid": (2, 2)} if kind == "tiled_svd" else {}
  return tnn.make_plan(dense, kind, ratio=0.3, **extra)


def _step_export(model, cfg, teacher=None, mask=None, loss=None):
  tx = optax.sgd(0.01, momentum=0.9)
  graphdef, state = steps_lib.init_state(model, tx, 0)
  step = steps_lib.make_train_step(graphdef, tx, cfg, mask, loss=loss)
  args = (_abstract(state), _batch())
  if teacher is not None:
    tg, tp, tr = steps_lib.split_model(teacher)
    args = (*args, (tg, _abstract(tp), _abstract(tr)))
  return jax.export.export(step, platforms=PLATFORMS)(*args)


def _cfg(**kw):
  return steps_lib.StepConfig(num_classes=4, mean=(0.5,), std=(0.3,), **kw)


LAYER_KINDS = tuple(k for k in KINDS if k != "tiled_svd")  # tiled SVD: a distortion only


def test_tiled_svd_has_no_layer_and_says_so():
  with pytest.raises(ValueError, match="has no factorized conv layer"):
    _model("tiled_svd")


@pytest.mark.parametrize("kind", ("dense", *LAYER_KINDS))
def test_train_step_lowers(kind):
  model, _ = _model(kind)
  calls = _check(_step_export(model, _cfg()))
  assert not [c for c in calls if any(s in c for s in SOLVERS)], calls  # no solver in a plain step


@pytest.mark.parametrize("kind", KINDS)
def test_deeptwist_step_lowers_and_its_solver_calls_are_counted(kind, record_property):
  dense = _dense()
  plan = _plan(dense, kind)
  groups = steps_lib.distortion_groups(dense, plan)
  calls = _check(_step_export(dense, _cfg(sd=5, groups=groups)))
  solver = [c for c in calls if any(s in c for s in SOLVERS)]
  record_property("solver_calls", len(solver))
  print(f"\nDeepTwist {kind}: {len(groups)} kernel groups, solver calls {solver}")
  if kind in ("tucker2", "svd", "tiled_svd", "mtk"):
    assert solver, calls  # a distortion that needs an eigensolver calls one (batched)


def test_distillation_steps_lower():
  teacher = _dense()
  student, _ = _model("tt")
  _check(_step_export(student, _cfg(), teacher=teacher, loss=steps_lib.Distillation()))
  mask = steps_lib.block_mask(steps_lib.split_model(student)[1], 1)
  _check(_step_export(student, _cfg(), teacher=teacher, mask=mask, loss=steps_lib.BlockMSE(1)))


K = jax.ShapeDtypeStruct((3, 3, 16, 32), jnp.float32)
M = jax.ShapeDtypeStruct((32, 144), jnp.float32)
X3 = jax.ShapeDtypeStruct((8, 9, 10), jnp.float32)

DECOMPOSITIONS = {
  "hosvd": (lambda x: decomp.hosvd(x, (4, 4, 4)), X3),
  "hooi": (lambda x: decomp.hooi(x, (4, 4, 4), n_iter=3)[0], X3),
  "tucker2": (lambda k: decomp.tucker2(k, (4, 8)), K),
  "tucker2_svd": (lambda k: decomp.tucker2(k, (4, 8), method="svd"), K),
  "tucker2_sweep": (lambda k: decomp.tucker2_sweep(k, (4, 8)), K),
  "cp_als": (lambda x: decomp.cp_als(x, 4, key=jax.random.key(0), n_iter=3)[0], X3),
  "tt_svd": (lambda x: decomp.tt_svd(x, ranks=(3, 3)), X3),
  "tr_svd": (lambda x: decomp.tr_svd(x, ranks=(2, 3, 3)), X3),
  "lowered_svd": (lambda k: decomp.lowered_svd(k, 6), K),
  "tiled_svd": (lambda m: decomp.tiled_svd(m, grid=(2, 2), rank=4), M),
}


@pytest.mark.parametrize("name", sorted(DECOMPOSITIONS))
def test_public_decompositions_lower(name):
  fn, arg = DECOMPOSITIONS[name]
  calls = _check(
    jax.export.export(jax.jit(lambda x: decomp.reconstruct(fn(x))), platforms=PLATFORMS)(arg)
  )
  assert calls, name  # each calls an eigensolver or SVD


def test_rsdtr_search_programs_lower(monkeypatch):
  jobs = []
  real = rsdtr_lib._executables

  def record(js):
    jobs.extend(js)
    return real(js)

  monkeypatch.setattr(rsdtr_lib, "_executables", record)
  k = np.random.default_rng(0).standard_normal((3, 3, 8, 16)).astype(np.float32)
  decomp.rsdtr(k, eps=0.5)
  assert len(jobs) >= 2
  for program, args, static in jobs:
    exp = jax.export.export(program, platforms=PLATFORMS)(*_abstract(args), **static)
    _check(exp)
