"""oneDNN convolutions (`tnn.onednn`): values and both gradients against XLA's convolution
in float64, batch-partitioned programs, the GPU/TPU lowering, the dispatch of what is out
of scope, and a ResNet train step through them against the same step through XLA."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import tnn
from tnn import functional as F
from tnn import onednn, ops
from train import steps as steps_lib
from train import trainer

OK, WHY = onednn.available()
pytestmark = pytest.mark.skipif(not OK, reason=f"oneDNN not available: {WHY}")
NHWC = ("NHWC", "HWIO", "NHWC")
TARGET = "tensorial_onednn_conv"


def _data(x_shape, w_shape, seed=0):
  r = np.random.default_rng(seed)
  x = r.standard_normal(x_shape).astype(np.float32)
  w = (r.standard_normal(w_shape) / np.sqrt(np.prod(w_shape[:3]))).astype(np.float32)
  return x, w


def _reference(x, w, strides, pads, dy):
  """Output, dx, dw in float64 through XLA's convolution."""
  x, w, dy = (jnp.asarray(a, jnp.float64) for a in (x, w, dy))
  groups = x.shape[3] // w.shape[2]

  def f(x, w):
    return lax.conv_general_dilated(
      x, w, strides, pads, dimension_numbers=NHWC, feature_group_count=groups
    )

  y, vjp = jax.vjp(f, x, w)
  return (y, *vjp(dy))


# XLA's CPU thread pool has a thread per schedulable core: a batch of at least that many
# images is convolved in slices on XLA's threads, a smaller one by oneDNN's own threads.
_THREADS = len(os.sched_getaffinity(0))

CASES = [
  # x shape, kernel shape, strides, pads
  ((1, 8, 8, 16), (3, 3, 16, 16), (1, 1), ((1, 1), (1, 1))),  # one image: oneDNN's threads
  # slices of unequal size (the kernel gradient summed over them), strided
  ((2 * _THREADS + 1, 7, 7, 4), (3, 3, 4, 8), (2, 2), ((1, 1), (1, 1))),
  ((4, 8, 8, 16), (3, 3, 16, 16), (1, 1), ((1, 1), (1, 1))),
  ((4, 8, 8, 16), (3, 3, 16, 32), (2, 2), ((1, 1), (1, 1))),
  ((3, 9, 7, 5), (3, 3, 5, 4), (2, 1), ((0, 1), (2, 0))),  # odd sizes, asymmetric pads
  ((2, 8, 8, 6), (1, 1, 6, 10), (2, 2), ((0, 0), (0, 0))),  # 1x1, strided shortcut
  ((2, 8, 8, 3), (3, 1, 3, 5), (1, 1), ((1, 1), (0, 0))),  # RSDTR's d x 1
  ((2, 8, 8, 3), (1, 3, 3, 5), (1, 2), ((0, 0), (1, 1))),  # and 1 x d
  ((2, 12, 12, 1), (5, 5, 1, 6), (1, 1), ((2, 2), (2, 2))),  # LeNet's one-channel stem
  ((2, 12, 12, 6), (5, 5, 6, 4), (1, 1), ((0, 0), (0, 0))),  # VALID
  ((6, 8, 8, 4), (3, 3, 4, 1), (2, 2), ((1, 1), (1, 1))),  # the m-forms' Q -> 1 conv
  ((2, 8, 8, 6), (3, 1, 1, 6), (2, 1), ((1, 1), (0, 0))),  # CP's depthwise d x 1
  ((2, 8, 8, 6), (1, 3, 1, 6), (1, 2), ((0, 0), (1, 1))),  # and 1 x d
  ((2, 8, 8, 6), (3, 3, 1, 12), (1, 1), ((1, 1), (1, 1))),  # depthwise, 2 outputs a channel
  ((2, 7, 9, 8), (3, 3, 2, 12), (1, 1), ((1, 0), (0, 1))),  # 4 groups, 2 in, 3 out each
]


@pytest.mark.parametrize("x_shape,w_shape,strides,pads", CASES)
def test_values_and_gradients_match_xla_float64(x_shape, w_shape, strides, pads):
  x, w = _data(x_shape, w_shape)
  out_shape = onednn._out_shape(x_shape, w_shape, strides, pads)
  dy = np.random.default_rng(1).standard_normal(out_shape).astype(np.float32)
  y0, dx0, dw0 = _reference(x, w, strides, pads, dy)

  f = jax.jit(lambda x, w: onednn.conv(x, w, strides, pads))
  y, vjp = jax.vjp(f, jnp.asarray(x), jnp.asarray(w))
  dx, dw = vjp(jnp.asarray(dy))
  assert TARGET in f.lower(x, w).as_text()
  for got, want in ((y, y0), (dx, dx0), (dw, dw0)):
    assert got.dtype == jnp.float32 and got.shape == want.shape
    scale = float(jnp.max(jnp.abs(want)))
    np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(want), atol=2e-5 * scale)


def test_a_wrong_kernel_is_caught():
  """The check above can fail: a conv against the reference of a transposed kernel."""
  x, w = _data((2, 8, 8, 4), (3, 3, 4, 4))
  pads = ((1, 1), (1, 1))
  y = onednn.conv(jnp.asarray(x), jnp.asarray(w), (1, 1), pads)
  wrong = _reference(x, np.swapaxes(w, 0, 1), (1, 1), pads, np.zeros((2, 8, 8, 4)))[0]
  assert float(np.max(np.abs(np.asarray(y, np.float64) - np.asarray(wrong)))) > 1e-2


def test_batch_partitioned_over_two_devices():
  """Sharded over the batch, each device convolves its rows (no gather of the activations)
  and the kernel gradient is summed across devices: the same numbers as one device."""
  if jax.device_count() < 2:
    pytest.skip("needs two devices (conftest forces two CPU devices)")
  mesh = jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  x, w = _data((8, 8, 8, 4), (3, 3, 4, 6))
  pads = ((1, 1), (1, 1))

  def loss(x, w):
    return jnp.sum(onednn.conv(x, w, (1, 1), pads) ** 2)

  grad = jax.jit(jax.grad(loss, (0, 1)))
  xs = jax.device_put(x, NamedSharding(mesh, P("data")))
  ws = jax.device_put(w, NamedSharding(mesh, P()))
  dx, dw = grad(xs, ws)
  dx1, dw1 = jax.jit(jax.grad(loss, (0, 1)))(jnp.asarray(x), jnp.asarray(w))
  np.testing.assert_allclose(np.asarray(dx), np.asarray(dx1), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(dw), np.asarray(dw1), rtol=1e-5, atol=1e-4)
  assert dx.sharding.spec == P("data")
  hlo = grad.lower(xs, ws).compile().as_text()
  assert "all-gather" not in hlo
  assert "all-reduce" in hlo  # the kernel gradient's sum over the two halves


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_lowered_for_gpu_and_tpu_is_xla_convolution(platform):
  x, w = _data((2, 8, 8, 4), (3, 3, 4, 4))

  def f(x, w):
    return jax.grad(lambda x, w: jnp.sum(onednn.conv(x, w, (1, 1), ((1, 1), (1, 1)))), 1)(x, w)

  text = jax.export.export(jax.jit(f), platforms=(platform,))(x, w).mlir_module()
  assert TARGET not in text
  assert "convolution" in text


def test_out_of_scope_convolutions_go_to_xla():
  """float64 and dilated convolutions are lax's; float32 NHWC ones are oneDNN's, 'SAME'
  padding and feature groups included."""
  x, w = _data((2, 8, 8, 4), (3, 3, 4, 4))
  x64, w64 = x.astype(np.float64), w.astype(np.float64)

  def lowered(fn, *a):
    return jax.jit(fn).lower(*a).as_text()

  def same(x, w):
    return onednn.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=NHWC)

  def grouped(x, w):
    return onednn.conv_general_dilated(
      x, w[:, :, :2], (1, 1), "SAME", dimension_numbers=NHWC, feature_group_count=2
    )

  def dilated(x, w):
    return onednn.conv_general_dilated(
      x, w, (1, 1), "SAME", dimension_numbers=NHWC, rhs_dilation=(2, 2)
    )

  assert TARGET in lowered(same, x, w)
  assert TARGET not in lowered(same, x64, w64)
  assert TARGET in lowered(grouped, x, w)
  assert TARGET not in lowered(dilated, x, w)
  np.testing.assert_allclose(
    np.asarray(jax.jit(same)(x, w)),
    np.asarray(lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=NHWC)),
    rtol=1e-5,
    atol=1e-5,
  )
  np.testing.assert_allclose(
    np.asarray(jax.jit(grouped)(x, w)),
    np.asarray(
      lax.conv_general_dilated(
        x, w[:, :, :2], (1, 1), "SAME", dimension_numbers=NHWC, feature_group_count=2
      )
    ),
    rtol=1e-5,
    atol=1e-5,
  )


def test_conv_backend_is_a_trace_time_choice():
  x, w = _data((2, 8, 8, 4), (3, 3, 4, 4))

  def f(x, w):
    return ops.conv(x, w, padding="SAME")

  assert TARGET not in jax.jit(f).lower(x, w).as_text()

  def g(x, w):
    with ops.conv_backend("onednn"):
      return ops.conv(x, w, padding="SAME")

  assert TARGET in jax.jit(g).lower(x, w).as_text()
  with pytest.raises(ValueError, match="conv backend: got 'mkl'"):
    with ops.conv_backend("mkl"):
      pass


def test_build_error_names_the_missing_compiler(tmp_path, monkeypatch):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  with pytest.raises(RuntimeError, match="no C\\+\\+ compiler '/nonexistent/g\\+\\+'"):
    onednn._build("/nonexistent/g++")
  assert not [f for f in os.listdir(tmp_path / "tensorial") if f.endswith(".so")]


@pytest.mark.parametrize("method", ["svd", "tucker2", "cp", "tt", "tr", "mcp", "mtk", "mtt", "mtr"])
@pytest.mark.parametrize("forward", ["factorized", "reconstructed"])
def test_every_factorized_layer_through_onednn_equals_xla(method, forward):
  """Each layer kind's forward path (its pipeline's convs, or the rebuilt kernel's one conv)
  through oneDNN against the same path through XLA, float32: output and the gradients of
  the factors and of the input."""
  with jax.enable_x64(False), jax.numpy_dtype_promotion("standard"):
    dense = tnn.models.resnet20(10, rngs=nnx.Rngs(0))
    small = tnn.factorize_random(
      dense, tnn.make_plan(dense, method, ratio=0.3), nnx.Rngs(1), forward=forward
    )
    layers = [m for m in tnn.layer_paths(small).values() if isinstance(m, tnn.layers.Factorized)]
    # a 16-channel conv at 32x32 and the strided 16 -> 32 one
    for layer in (layers[0], next(m for m in layers if m.strides == (2, 2))):
      g, st = nnx.split(layer)
      x = jnp.asarray(_data((4, 32, 32, layer.weight_shape[2]), (1, 1, 1, 1))[0])

      def loss(st, x, backend, g=g):
        with ops.conv_backend(backend):
          y = nnx.merge(g, st)(x)
        return jnp.sum(y * jnp.cos(y)), y

      results, texts = {}, {}
      for backend in ("xla", "onednn"):
        f = jax.jit(jax.grad(lambda st, x, b=backend: loss(st, x, b), (0, 1), has_aux=True))
        texts[backend] = f.lower(st, x).as_text()
        results[backend] = f(st, x)
      # every convolution of XLA's program is oneDNN's in the other, and so are the
      # pipelines' 1x1 channel contractions and CP's depthwise convs
      assert TARGET not in texts["xla"]
      assert TARGET in texts["onednn"] and "convolution" not in texts["onednn"]
      for got, want in zip(
        jax.tree.leaves(results["onednn"]), jax.tree.leaves(results["xla"]), strict=True
      ):
        scale = float(jnp.max(jnp.abs(want)))
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4 * scale)


@pytest.mark.parametrize(
  "cls, ranks", [(tnn.layers.TRConv, (3, 2, 4, 3)), (tnn.layers.TTConv, (5, 3, 4))]
)
@pytest.mark.parametrize("paired", [False, True])
def test_tr_layer_through_onednn_in_both_forms_equals_float64(cls, ranks, paired, monkeypatch):
  """A TR / TT layer under `conv_backend("onednn")` runs as the four-conv pipeline or, the
  cores contracted pairwise first, as two convs (`tnn.functional._tr_paired`). Each form,
  forced, against the float64 conv through the reconstructed kernel: output and the
  gradients of the cores, the bias and the input; stride 1 and a strided 'SAME' layer,
  batches on both threading paths (one image; slices)."""
  monkeypatch.setattr(F, "_PAIRED_SLACK", 1e9 if paired else 0.0)
  for (s, t, strides), n in zip(((6, 8, 1), (8, 5, 2)), (2 * _THREADS + 1, 1), strict=True):
    layer = cls(s, t, (3, 3), ranks, strides=strides, rngs=nnx.Rngs(0))
    layer.bias[...] = jnp.linspace(-1.0, 1.0, t, dtype=jnp.float32)
    g, st = nnx.split(layer)
    x = jnp.asarray(_data((n, 9, 7, s), (1, 1, 1, 1))[0])

    def loss(st, x, g=g):
      with ops.conv_backend("onednn"):
        y = nnx.merge(g, st)(x)
      return jnp.sum(y * jnp.sin(y)), y

    f = jax.jit(jax.grad(loss, (0, 1), has_aux=True))
    text = f.lower(st, x).as_text()
    assert text.count("tensorial_onednn_conv_fwd") == (2 if paired else 4)
    assert "convolution" not in text
    got = f(st, x)

    def loss64(st, x, layer=layer):
      p = {k: st[k][...] for k in layer.names}
      w = layer.kind.kernel(p, layer.weight_shape, layer.hyper)
      pads = ops.pads(x.shape[1:3], (3, 3), layer.strides, "SAME")
      y = lax.conv_general_dilated(x, w, layer.strides, pads, dimension_numbers=NHWC)
      y = y + st["bias"][...].reshape(1, 1, 1, -1)
      return jnp.sum(y * jnp.sin(y)), y

    want = jax.grad(loss64, (0, 1), has_aux=True)(
      jax.tree.map(lambda a: a.astype(jnp.float64), st), x.astype(jnp.float64)
    )
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
      scale = float(jnp.max(jnp.abs(b)))
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5 * scale)


def test_tr_pairing_rule():
  """ResNet-32's TR and TT layers at 25% (ranks 3/5/8, 7/14/29) run paired; a ring whose
  pairwise products are large beside its pipeline (`R2` wide, the rest 1) does not."""
  pads = ((1, 1), (1, 1))
  cases = [((16, 32), (3,) * 4), ((32, 16), (5,) * 4), ((64, 8), (8,) * 4)]
  cases += [((16, 32), (1, 7, 7, 7)), ((32, 16), (1, 14, 14, 14)), ((64, 8), (1, 29, 29, 29))]
  cases += [((64, 8), (1, 1, 64, 1))]
  for (c, hw), ranks in cases:
    paired = F._tr_paired((32, hw, hw, c), (3, 3, c, c), ranks, (1, 1), pads)
    assert paired == (ranks != (1, 1, 64, 1)), ranks


def _models():
  """ResNet-20 and a Tucker-2 net with random factors. Not `tnn.compress` of the random
  dense net: that one has near-constant channels (a random kernel's truncation) whose
  BatchNorm makes its float32 gradient ill-conditioned (measured: 1e-6 noise on the input
  moves it 4.8e-3 normwise), below which no two backends' rounding can be told apart; on
  this one the same noise moves it 9e-4 and the two backends agree to 9e-7."""
  dense = tnn.models.resnet20(10, in_channels=1, rngs=nnx.Rngs(0))
  plan = tnn.make_plan(dense, "tucker2", ratio=0.25)
  return dense, tnn.factorize_random(dense, plan, nnx.Rngs(1))


def _normwise(a, b) -> float:
  d = sum(
    float(np.sum((np.asarray(x, np.float64) - np.asarray(y, np.float64)) ** 2))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  )
  n = sum(float(np.sum(np.asarray(y, np.float64) ** 2)) for y in jax.tree.leaves(b))
  return (d / n) ** 0.5


def test_resnet_gradients_through_onednn_equal_xla(monkeypatch):
  """ResNet-20 (stem, strided convs, BatchNorm in train mode) and its Tucker-2 compression:
  the cross-entropy gradient of every parameter through oneDNN (and tensorial's BatchNorm
  reductions) and through XLA, each against the float64 gradient, normwise.

  With ReLU the float32 gradient is not a continuous function of rounding: a
  pre-activation within rounding of 0 flips its unit's gradient on or off, and on this
  input the two backends' rounding lands on either side of such kinks (measured: each
  backend 7e-7 from float64 on one net and 8e-4 to 1.3e-3 on the other; 1e-6 noise on the
  input moves the gradient 5e-5 to 9e-4). The kinks are not what is tested here, so the
  models' ReLU is GELU for this test; then the gradients are 1.6e-6 to 2.2e-6 from float64
  and 1e-6 noise moves them 4e-6 to 5e-6."""
  monkeypatch.setattr(jax.nn, "relu", jax.nn.gelu)
  with jax.numpy_dtype_promotion("standard"):
    r = np.random.default_rng(0)
    x = np.asarray(r.standard_normal((8, 32, 32, 1)).astype(np.float32))
    labels = jnp.asarray(r.integers(0, 10, (8,), dtype=np.int32))
    for model in _models():
      g, p, rest = nnx.split(model, nnx.Param, ...)

      def loss(p, rest, x, backend, g=g):
        m = nnx.merge(g, p, rest, copy=True)
        m.train()
        with ops.conv_backend(backend):
          logits = m(x)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))

      def f64(t):
        return jax.tree.map(lambda a: a.astype(jnp.float64) if a.dtype == jnp.float32 else a, t)

      grad = jax.jit(jax.grad(loss), static_argnums=3)
      want = grad(f64(p), f64(rest), x.astype(np.float64), "xla")
      for backend in ("xla", "onednn"):
        got = grad(p, rest, jnp.asarray(x), backend)
        assert _normwise(got, want) < 1e-5, backend


def _step_results(model, cpu_conv):
  cfg = steps_lib.StepConfig(num_classes=10, mean=(0.5,), std=(0.25,), pad_to=32, cpu_conv=cpu_conv)
  tx, _ = trainer.make_optimizer(dict(lr=0.1), 100)
  graphdef, state = steps_lib.init_state(model, tx, 0)
  step = steps_lib.make_train_step(graphdef, tx, cfg)
  r = np.random.default_rng(0)
  batch = (
    jnp.asarray(r.integers(0, 256, (8, 28, 28, 1), dtype=np.uint8)),
    jnp.asarray(r.integers(0, 10, (8,), dtype=np.int32)),
  )
  text = step.lower(state, batch).as_text()
  state = jax.tree.map(jnp.copy, state)
  state, metrics = step(state, batch)
  return state, metrics, text


def test_resnet_train_step_through_onednn():
  """The train step with `cpu_conv="onednn"` runs its convolutions through oneDNN and
  takes the XLA step's step: the same loss, the updated params within 1e-2 normwise of the
  update. Not closer: this random net's gradient is ill-conditioned (BatchNorm over
  near-constant compressed channels, batch 8), and the step normalises and pads its input
  inside the program, where XLA fuses that into its first convolution in one program and
  not in the other; the rounding difference of the input is amplified. Measured: 2.1e-4
  normwise on the gradient with the convs alone through oneDNN, 1.6e-3 with the 1x1s too,
  and 1.2e-6 when the input is computed outside (the test above)."""
  with jax.enable_x64(False), jax.numpy_dtype_promotion("standard"):
    for model in _models():
      _, init = steps_lib.init_state(model, trainer.make_optimizer(dict(lr=0.1), 100)[0], 0)
      s0, m0, t0 = _step_results(model, "xla")
      s1, m1, t1 = _step_results(model, "onednn")
      assert TARGET not in t0 and TARGET in t1
      np.testing.assert_allclose(float(m1["loss"]), float(m0["loss"]), rtol=1e-5)
      update = jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), s0.params, init.params)
      moved = jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), s1.params, init.params)
      assert _normwise(moved, update) < 1e-2


def test_groups_that_do_not_divide_are_refused():
  x, w = _data((2, 8, 8, 6), (3, 3, 4, 6))  # 4 input channels a group do not divide 6
  with pytest.raises(ValueError, match=r"w.shape\[2\] = 4 must divide x's 6 channels"):
    onednn.conv(jnp.asarray(x), jnp.asarray(w), (1, 1), ((1, 1), (1, 1)))
  x, w = _data((2, 8, 8, 6), (3, 3, 2, 4))  # 3 groups, 4 outputs
  with pytest.raises(ValueError, match="divide w's 4 output channels"):
    onednn.conv(jnp.asarray(x), jnp.asarray(w), (1, 1), ((1, 1), (1, 1)))


def test_under_vmap_each_item_is_its_own_conv_and_sums():
  """`jax.vmap` over oneDNN's convs (every `ffi_call` names `vmap_method="sequential"`):
  each mapped item equals XLA's float64 conv of that item, in values and both gradients;
  the BatchNorm sums too."""
  x, w = _data((3, 2, 6, 5, 4), (3, 3, 3, 4, 8))
  dy = np.random.default_rng(1).standard_normal((3, 2, 6, 5, 8)).astype(np.float32)
  pads = ((1, 1), (1, 1))

  def f(x, w):
    return onednn.conv(x, w, (1, 1), pads)

  y, vjp = jax.vjp(jax.vmap(f), jnp.asarray(x), jnp.asarray(w))
  dx, dw = vjp(jnp.asarray(dy))
  for i in range(3):
    want = _reference(x[i], w[i], (1, 1), pads, dy[i])
    for got, ref in zip((y[i], dx[i], dw[i]), want, strict=True):
      np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(ref))))
  k = jnp.asarray(x[0, 0, 0, 0])  # one shift for every item: an unbatched operand
  s1, s2 = jax.vmap(onednn.batch_sums, in_axes=(0, None))(jnp.asarray(x), k)
  for i in range(3):
    d = np.float64(x[i]) - np.float64(x[0, 0, 0, 0])
    np.testing.assert_allclose(s1[i], d.sum((0, 1, 2)), rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(s2[i], (d * d).sum((0, 1, 2)), rtol=1e-5, atol=1e-3)
