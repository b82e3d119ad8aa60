"""oneDNN convolutions for programs lowered for the CPU (an XLA FFI custom call).

XLA's CPU backend runs the 3x3 convolutions of a CIFAR ResNet 2-5x slower than the
oneDNN kernels PyTorch calls, and its weight gradient adds a transpose of every
activation (README, "Measured: layers"). This module runs a float32 NHWC/HWIO convolution,
its input gradient and its weight gradient as oneDNN primitives inside the jitted
program, through three XLA FFI handlers (`tnn/_cpu_kernels.cc`). It is chosen where the
program is lowered, with `lax.platform_dependent`: lowered for the CPU, the custom calls;
lowered for cuda or tpu, `lax.conv_general_dilated` as before. Data-parallel programs
stay data parallel: each custom call is partitioned over the batch dimension
(`custom_partitioning`), and the weight gradient is summed over the batch's mesh axes.

Threads: the handlers run a batch of at least as many images as XLA's CPU thread pool has
threads as that many slices, each single-threaded on one of XLA's threads (the kernel
gradient summed over them in a fixed order), and a smaller batch on oneDNN's own OpenMP
threads. Debian's oneDNN threads with OpenMP, a pool beside XLA's; handing the cores from
one to the other at each custom call was half the oneDNN time in a ResNet-32 train step
(`tnn/_cpu_kernels.cc`, `Run`).

The same library holds BatchNorm's two per-channel reductions (`batch_sums`,
`batch_grad_sums`: one pass over the activations on XLA's threads), which `tnn.norm` calls
under `conv_backend("onednn")`.

Nothing happens at import. `load()` compiles the handlers once per machine (g++, the
headers of jaxlib's FFI and of oneDNN: Debian's `libdnnl-dev`) into
`$XDG_CACHE_HOME/tensorial` (default `~/.cache/tensorial`), loads them and registers the
three targets for the CPU platform; it raises `RuntimeError` naming what is missing.
Which convolutions use it is a trace-time choice, `tnn.ops.conv_backend("onednn")`, that
the `train` steps make from `config.cpu_conv` (`tnn.ops`).

Scope: float32, 2-D, NHWC activations, HWIO kernels, feature groups (depthwise
included), no dilation, non-negative padding. `conv_general_dilated` sends every other
convolution to `lax.conv_general_dilated` (bfloat16 compute, dilation, batch groups);
`supported` says which.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import subprocess
import tempfile
import threading

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_cpu_kernels.cc")
_TARGETS = {
  "fwd": ("tensorial_onednn_conv_fwd", "TensorialConvFwd"),
  "bwd_data": ("tensorial_onednn_conv_bwd_data", "TensorialConvBwdData"),
  "bwd_weights": ("tensorial_onednn_conv_bwd_weights", "TensorialConvBwdWeights"),
  "bn_sums": ("tensorial_bn_sums", "TensorialBnSums"),
  "bn_grad_sums": ("tensorial_bn_grad_sums", "TensorialBnGradSums"),
}
_NHWC = ("NHWC", "HWIO", "NHWC")
_lock = threading.Lock()
_loaded: str | None = None  # the path of the loaded library


def _cache_dir() -> str:
  root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(root, "tensorial")


def _build(cxx: str) -> str:
  """Compiles the handlers (once per source, jaxlib and compiler) and returns the path."""
  import jaxlib

  include = jax.ffi.include_dir()
  with open(_SOURCE, "rb") as f:
    source = f.read()
  key = hashlib.sha256(
    source + jaxlib.__version__.encode() + include.encode() + cxx.encode()
  ).hexdigest()[:16]
  out = os.path.join(_cache_dir(), f"onednn_conv-{key}.so")
  if os.path.exists(out):
    return out
  os.makedirs(_cache_dir(), exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=_cache_dir())
  os.close(fd)
  cmd = [cxx, "-O3", "-std=c++17", "-shared", "-fPIC", "-fvisibility=hidden"]
  cmd += ["-I", include, _SOURCE, "-o", tmp, "-ldnnl", "-fopenmp"]
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True)
  except FileNotFoundError:
    os.unlink(tmp)
    raise RuntimeError(
      f"oneDNN convolutions: no C++ compiler {cxx!r} (set CXX, or install g++)."
    ) from None
  if proc.returncode != 0:
    os.unlink(tmp)
    tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
    raise RuntimeError(
      "oneDNN convolutions could not be built (they need oneDNN's headers and library: "
      f"`apt-get install libdnnl-dev` on Debian/Ubuntu). {cxx} said:\n{tail}"
    )
  os.replace(tmp, out)  # atomic: concurrent builders (test workers) agree
  return out


def load() -> str:
  """Builds (once per machine), loads and registers the CPU handlers; returns the
  library's path. Raises `RuntimeError` saying what is missing. Idempotent."""
  global _loaded
  with _lock:
    if _loaded is None:
      path = _build(os.environ.get("CXX", "g++"))
      try:
        lib = ctypes.CDLL(path)
      except OSError as e:
        raise RuntimeError(f"oneDNN convolutions: {path} does not load ({e}).") from None
      for target, symbol in _TARGETS.values():
        capsule = jax.ffi.pycapsule(getattr(lib, symbol))
        jax.ffi.register_ffi_target(target, capsule, platform="cpu")
      _loaded = path
    return _loaded


def available() -> tuple[bool, str]:
  """`(True, library path)` if `load()` succeeds, else `(False, why)`."""
  try:
    return True, load()
  except RuntimeError as e:
    return False, str(e)


# --- the three handlers as partitioned calls ----------------------------------------


def _attrs(strides, pads) -> dict:
  (plh, phh), (plw, phw) = pads
  return {
    k: np.int64(v)
    for k, v in zip(
      ("sh", "sw", "plh", "phh", "plw", "phw"), (*strides, plh, phh, plw, phw), strict=True
    )
  }


def _call(which: str, a, b, shape, strides, pads):
  target = _TARGETS[which][0]
  out = jax.ShapeDtypeStruct(shape, a.dtype)
  # Under `jax.vmap`, one call per mapped item: the kernel takes exactly (N, H, W, C) and one
  # kernel (a vmap over convs is rare; XLA's own conv batches them as well as a loop).
  return jax.ffi.ffi_call(target, out, vmap_method="sequential")(a, b, **_attrs(strides, pads))


def _batch_axes(sharding):
  spec = getattr(sharding, "spec", None)
  return spec[0] if spec is not None and len(spec) else None


def _partitioned(which: str, rule: str):
  """`which`'s custom call, split over the mesh axes of its first operand's batch dim.

  fwd and bwd_data: batch in, batch out, the kernel replicated. bwd_weights (`x`, `dy`
  both batch-split): each shard's kernel gradient, summed over those axes.
  """
  reduce = which == "bwd_weights"

  @functools.partial(custom_partitioning, static_argnums=(2, 3, 4))
  def call(a, b, shape, strides, pads):
    return _call(which, a, b, shape, strides, pads)

  def shardings(mesh, arg_shapes):
    ax = _batch_axes(arg_shapes[0].sharding)
    args = (NamedSharding(mesh, P(ax)), NamedSharding(mesh, P(ax) if reduce else P()))
    return ax, args, NamedSharding(mesh, P() if reduce else P(ax))

  def partition(shape, strides, pads, mesh, arg_shapes, result_shape):
    ax, args, out = shardings(mesh, arg_shapes)

    def lower(a, b):
      local = shape if reduce else (a.shape[0], *shape[1:])
      y = _call(which, a, b, local, strides, pads)
      return lax.psum(y, ax) if reduce and ax is not None else y

    return mesh, lower, out, args

  def infer(shape, strides, pads, mesh, arg_shapes, result_shape):
    return shardings(mesh, arg_shapes)[2]

  call.def_partition(partition=partition, infer_sharding_from_operands=infer, sharding_rule=rule)
  return call


_RULES = {  # Shardy sharding rules: n the batch, c and o the channels, k = c / groups
  "fwd": "n h w c, i j k o -> n p q o",
  "bwd_data": "n p q o, i j k o -> n h w c",
  "bwd_weights": "n h w c, n p q o -> i j k o",
}


@functools.cache
def _partitioned_call(which: str):
  # built on first use, not at import
  return _partitioned(which, _RULES[which])


def _looped_under_vmap(fn):
  """`fn(*arrays)` as is; under `jax.vmap`, one call per mapped item (`lax.map`).

  A `custom_partitioning` call has no batching rule, and the kernels take exactly one
  `(N, H, W, C)` batch, so a vmapped conv (rare: XLA's own conv has no better way to
  batch it) loops. `custom_vmap` here sits under the conv's `custom_vjp`, so it is never
  differentiated itself."""

  @jax.custom_batching.custom_vmap
  def f(*arrays):
    return fn(*arrays)

  @f.def_vmap
  def _rule(axis_size, in_batched, *arrays):
    arrays = tuple(
      a if b else jnp.broadcast_to(a, (axis_size, *a.shape))
      for a, b in zip(arrays, in_batched, strict=True)
    )
    out = lax.map(lambda xs: f(*xs), arrays)
    return out, jax.tree.map(lambda _: True, out)

  return f


def _static_call(which: str, a, b, shape, strides, pads):
  return _looped_under_vmap(lambda a, b: _partitioned_call(which)(a, b, shape, strides, pads))(a, b)


def _fwd(*args):
  return _static_call("fwd", *args)


def _bwd_data(*args):
  return _static_call("bwd_data", *args)


def _bwd_weights(*args):
  return _static_call("bwd_weights", *args)


def _out_shape(x_shape, w_shape, strides, pads) -> tuple:
  n, h, w, _ = x_shape
  kh, kw, _, o = w_shape
  oh = (h + pads[0][0] + pads[0][1] - kh) // strides[0] + 1
  ow = (w + pads[1][0] + pads[1][1] - kw) // strides[1] + 1
  return (n, oh, ow, o)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _onednn_conv(x, w, strides, pads):
  return _fwd(x, w, _out_shape(x.shape, w.shape, strides, pads), strides, pads)


def _onednn_conv_fwd(x, w, strides, pads):
  return _onednn_conv(x, w, strides, pads), (x, w)


def _onednn_conv_bwd(strides, pads, res, dy):
  x, w = res
  return (
    _bwd_data(dy, w, x.shape, strides, pads),
    _bwd_weights(x, dy, w.shape, strides, pads),
  )


_onednn_conv.defvjp(_onednn_conv_fwd, _onednn_conv_bwd)


def _xla_conv(x, w, strides, pads):
  return lax.conv_general_dilated(
    x, w, strides, pads, dimension_numbers=_NHWC, feature_group_count=x.shape[3] // w.shape[2]
  )


# --- BatchNorm's reductions (tnn.norm) ------------------------------------------------


def _sums_call(which: str, *args):
  c = args[0].shape[-1]
  out = (jax.ShapeDtypeStruct((c,), np.float32),) * 2
  return jax.ffi.ffi_call(_TARGETS[which][0], out, vmap_method="sequential")(*args)


@functools.cache
def _partitioned_sums(which: str):
  """`which`'s custom call over a batch-split operand: each shard's sums, then summed over
  the batch's mesh axes (the per-channel operand replicated)."""
  rule = {"bn_sums": "n h w c, c -> c, c", "bn_grad_sums": "n h w c, n h w c, c -> c, c"}

  @custom_partitioning
  def call(*args):
    return _sums_call(which, *args)

  def shardings(mesh, arg_shapes):
    ax = _batch_axes(arg_shapes[0].sharding)
    args = tuple(NamedSharding(mesh, P(ax) if len(a.shape) > 1 else P()) for a in arg_shapes)
    return ax, args, (NamedSharding(mesh, P()),) * 2

  def partition(mesh, arg_shapes, result_shape):
    ax, args, out = shardings(mesh, arg_shapes)

    def lower(*a):
      sums = _sums_call(which, *a)
      return tuple(lax.psum(v, ax) for v in sums) if ax is not None else sums

    return mesh, lower, out, args

  def infer(mesh, arg_shapes, result_shape):
    return shardings(mesh, arg_shapes)[2]

  call.def_partition(
    partition=partition, infer_sharding_from_operands=infer, sharding_rule=rule[which]
  )
  return call


def _check_sums_args(name, arrays, c_arg):
  for a in arrays:
    if a.ndim != 4 or a.dtype != np.float32:
      raise ValueError(f"onednn.{name}: needs 4-D float32 arrays, got {a.dtype}{a.shape}.")
  if arrays[-1].shape != arrays[0].shape:
    raise ValueError(
      f"onednn.{name}: the arrays' shapes differ: {arrays[0].shape} and {arrays[-1].shape}."
    )
  if c_arg.shape != (arrays[0].shape[-1],) or c_arg.dtype != np.float32:
    raise ValueError(
      f"onednn.{name}: the per-channel vector must be float32 ({arrays[0].shape[-1]},), got"
      f" {c_arg.dtype}{c_arg.shape}."
    )


def batch_sums(x: jax.Array, k: jax.Array) -> tuple[jax.Array, jax.Array]:
  """`(sum(x - k), sum((x - k)**2))` over every axis but the last of `x` `(N, H, W, C)`
  float32, `k` `(C,)`: one pass over `x`, on XLA's threads; accumulated in float within
  blocks of 32 rows and in double across them. Lowered for the CPU only (`tnn.norm` calls
  it inside its CPU branch). Batch-split `x` is summed per device, then across devices."""
  _check_sums_args("batch_sums", (x,), k)
  return _looped_under_vmap(_partitioned_sums("bn_sums"))(x, k)


def batch_grad_sums(dy: jax.Array, x: jax.Array, mean: jax.Array) -> tuple[jax.Array, jax.Array]:
  """`(sum(dy), sum(dy * (x - mean)))` over every axis but the last, as `batch_sums`: one
  pass over `dy` and `x` (`(N, H, W, C)` float32), `mean` `(C,)`. CPU only."""
  _check_sums_args("batch_grad_sums", (dy, x), mean)
  return _looped_under_vmap(_partitioned_sums("bn_grad_sums"))(dy, x, mean)


# --- public ------------------------------------------------------------------------


def conv(x: jax.Array, w: jax.Array, strides=(1, 1), pads=((0, 0), (0, 0))) -> jax.Array:
  """`lax.conv_general_dilated(x, w, strides, pads, feature_group_count=C // C_g)` of `x`
  `(N, H, W, C)` float32 and `w` `(d_h, d_w, C_g, T)` float32 (`C / C_g` groups: `C_g = C`
  one, `C_g = 1` depthwise), padding `pads = ((lo, hi), (lo, hi))`, `(N, H', W', T)` out:
  oneDNN where lowered for the CPU, XLA's convolution elsewhere. Differentiable in both
  arguments (oneDNN's backward-data and backward-weights primitives on the CPU)."""
  if x.ndim != 4 or w.ndim != 4:
    raise ValueError(f"onednn.conv: x and w must be 4-D, got shapes {x.shape} and {w.shape}.")
  c, c_g, t = x.shape[3], w.shape[2], w.shape[3]
  if c_g < 1 or c % c_g or t % (c // c_g):
    raise ValueError(
      f"onednn.conv: w.shape[2] = {c_g} must divide x's {c} channels into groups that also"
      f" divide w's {t} output channels."
    )
  strides = tuple(int(s) for s in strides)
  pads = tuple((int(lo), int(hi)) for lo, hi in pads)
  return lax.platform_dependent(
    x,
    w,
    cpu=functools.partial(_onednn_conv, strides=strides, pads=pads),
    default=functools.partial(_xla_conv, strides=strides, pads=pads),
  )


def supported(
  lhs,
  rhs,
  pads,
  *,
  dimension_numbers=None,
  lhs_dilation=None,
  rhs_dilation=None,
  feature_group_count=1,
  batch_group_count=1,
  preferred_element_type=None,
  out_sharding=None,
  **_,
) -> bool:
  """Whether `lax.conv_general_dilated(lhs, rhs, strides, pads, **kwargs)` is one `conv`
  runs (`supported(lhs, rhs, pads, **kwargs)`; explicit `((lo, hi), (lo, hi))` pads)."""
  if lhs.ndim != 4 or rhs.ndim != 4 or dimension_numbers is None:
    return False
  if lhs.dtype != np.float32 or rhs.dtype != np.float32:
    return False
  if preferred_element_type is not None and np.dtype(preferred_element_type) != np.float32:
    return False
  dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  if dn != lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC):
    return False
  if any(d != 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ()))):
    return False
  if batch_group_count != 1 or out_sharding is not None:
    return False
  if feature_group_count * rhs.shape[2] != lhs.shape[3]:
    return False
  return all(p >= 0 for pair in pads for p in pair)


def conv_general_dilated(lhs, rhs, window_strides, padding, **kwargs):
  """`lax.conv_general_dilated`'s signature (a drop-in for `nnx.Conv`'s
  `conv_general_dilated`): the convolutions in `conv`'s scope (`supported`) run through
  `conv`; the rest through `lax.conv_general_dilated` with the same arguments."""
  pads = padding
  if isinstance(padding, str):
    pads = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
  if not supported(lhs, rhs, pads, **kwargs):
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, **kwargs)
  return conv(lhs, rhs, window_strides, pads)
