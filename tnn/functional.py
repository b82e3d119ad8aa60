"""Factorized layers as pure functions: one `Kind` per layer kind.

A kind says, for a weight of a given shape and static hyper-parameters `hyper`:

- `shapes(weight_shape, hyper)`: the factor arrays it stores, by name (its params);
- `kernel(p, weight_shape, hyper)`: the dense weight the factors represent (the
  *reconstructed* path, and the oracle of every test);
- `apply(x, p, hyper, strides, padding)`: the *factorized* forward, built from `tnn.ops`;
- `macs(x_shape, weight_shape, hyper, strides, padding)`: its multiply-adds;
- `decompose(w, hyper)`: factors from a dense weight, through `decomp`;
- `terms(hyper)`: how many products of factor entries sum into one weight entry (for a
  variance-preserving random init).

Weights are Flax layouts: conv kernels HWIO `(d_h, d_w, S, T)`, dense `(S, T)`; images
NHWC `(N, H, W, S)`.

Conv kinds and their pipelines (the names the TNN and RSDTR papers use):

- `svd`: `u (d_h, d_w, S, r)`, `v (r, T)`; `d x d` conv `S -> r`, 1x1 `r -> T`
  (DeepTwist's lowered SVD).
- `tucker`: `u_s (S, r_S)`, `core (d_h, d_w, r_S, r_T)`, `u_t (T, r_T)`; 1x1, `d x d`, 1x1
  (Kim et al. 2016).
- `cp`: `a_s (S, R)`, `a_h (d_h, R)`, `a_w (d_w, R)`, `a_t (T, R)`; 1x1, depthwise `d x 1`,
  depthwise `1 x d`, 1x1 (Lebedev et al. 2015).
- `tr`: `g0 (R0, S, R1)`, `g1 (R1, d_h, R2)`, `g2 (R2, d_w, R3)`, `g3 (R3, T, R0)`; 1x1
  `S -> R0 R1`, `d x 1` and `1 x d` convs on the `R0`-fold batch, 1x1 closing the ring
  (RSDTR).
- `tt`: `tr` with `R0 = 1`.
- `mcp`, `mtk`, `mtt`, `mtr`: see `_mform`; channel contractions, then one `d x d`
  conv `Q -> 1` per output channel (T folded into the batch).

The CP weights are folded into `a_t`; a `tr` kernel is the ring `(S, d_h, d_w, T)`
read back in HWIO order.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

import decomp
from decomp.rsdtr import KERNEL_AXES, RING_AXES
from tnn import ops

_HI = jax.lax.Precision.HIGHEST


class Kind(NamedTuple):
  name: str
  shapes: Callable[..., dict]
  kernel: Callable[..., jax.Array]
  apply: Callable[..., jax.Array]
  macs: Callable[..., int]
  decompose: Callable[..., dict]
  terms: Callable[[Any], int]


def _split_pads(x_shape, kernel_hw, strides, padding):
  """Per-axis pads of the full `d_h x d_w` conv, so that separable pipelines match it."""
  return ops.pads(x_shape[1:3], kernel_hw, strides, padding)


def _conv_h(x, w_h, strides, ph, groups=1):
  """Conv along H only: `w_h` `(d_h, C_in / groups, C_out)`."""
  return ops.conv(x, w_h[:, None], strides=(strides[0], 1), padding=(ph, (0, 0)), groups=groups)


def _conv_w(x, w_w, strides, pw, groups=1):
  """Conv along W only: `w_w` `(d_w, C_in / groups, C_out)`."""
  return ops.conv(x, w_w[None], strides=(1, strides[1]), padding=((0, 0), pw), groups=groups)


def _hw_out(x_shape, kernel_hw, strides, padding):
  (ph, pw) = _split_pads(x_shape, kernel_hw, strides, padding)
  return (
    ops.out_size(x_shape[1], kernel_hw[0], strides[0], ph),
    ops.out_size(x_shape[2], kernel_hw[1], strides[1], pw),
  )


# --- svd: lowered SVD (DeepTwist section 4) -------------------------------------------


def _svd_shapes(ws, r):
  return {"u": (*ws[:3], r), "v": (r, ws[3])}


def _svd_kernel(p, ws, r):
  return jnp.tensordot(p["u"], p["v"], axes=1, precision=_HI)


def _svd_apply(x, p, r, strides, padding):
  y = ops.conv(x, p["u"], strides=strides, padding=padding)
  return ops.contract("nhwr,rt->nhwt", y, p["v"])


def _svd_macs(xs, ws, r, strides, padding):
  h, w = _hw_out(xs, ws[:2], strides, padding)
  return (
    ops.conv_macs(xs, (*ws[:3], r), strides=strides, padding=padding) + xs[0] * h * w * r * ws[3]
  )


def _svd_decompose(kernel, r):
  f = decomp.lowered_svd(kernel, r)
  return {"u": f.u, "v": f.v}


SVD = Kind("svd", _svd_shapes, _svd_kernel, _svd_apply, _svd_macs, _svd_decompose, lambda r: r)


# --- tucker: Tucker-2 (Kim et al. 2016) -------------------------------------------------


def _tucker_shapes(ws, ranks):
  r_s, r_t = ranks
  return {"u_s": (ws[2], r_s), "core": (*ws[:2], r_s, r_t), "u_t": (ws[3], r_t)}


def _tucker_kernel(p, ws, ranks):
  return jnp.einsum("hwab,sa,tb->hwst", p["core"], p["u_s"], p["u_t"], precision=_HI)


def _tucker_apply(x, p, ranks, strides, padding):
  y = ops.contract("nhws,sa->nhwa", x, p["u_s"])
  y = ops.conv(y, p["core"], strides=strides, padding=padding)
  return ops.contract("nhwb,tb->nhwt", y, p["u_t"])


def _tucker_macs(xs, ws, ranks, strides, padding):
  n, h, w, s = xs
  r_s, r_t = ranks
  ho, wo = _hw_out(xs, ws[:2], strides, padding)
  core = ops.conv_macs((n, h, w, r_s), (*ws[:2], r_s, r_t), strides=strides, padding=padding)
  return n * h * w * s * r_s + core + n * ho * wo * r_t * ws[3]


def _tucker_decompose(kernel, ranks):
  f = decomp.tucker2(kernel, ranks)
  return {"u_s": f.factors[2], "core": f.core, "u_t": f.factors[3]}


TUCKER = Kind(
  "tucker",
  _tucker_shapes,
  _tucker_kernel,
  _tucker_apply,
  _tucker_macs,
  _tucker_decompose,
  lambda ranks: ranks[0] * ranks[1],
)


# --- cp: rank-R CP of the 4-way kernel (Lebedev et al. 2015) ---------------------------


def _cp_shapes(ws, rank):
  d_h, d_w, s, t = ws
  return {"a_s": (s, rank), "a_h": (d_h, rank), "a_w": (d_w, rank), "a_t": (t, rank)}


def _cp_kernel(p, ws, rank):
  return jnp.einsum("hr,wr,sr,tr->hwst", p["a_h"], p["a_w"], p["a_s"], p["a_t"], precision=_HI)


def _cp_apply(x, p, rank, strides, padding):
  """The two depthwise convs are `d` shifted multiply-adds each (`ops.depthwise_1d`):
  elementwise work that XLA fuses, where a grouped conv with `R` groups runs slowly.

  Inside `conv_backend("onednn")` (float32) they are one `d_h x d_w` depthwise conv
  (oneDNN's) whose kernel is each channel's outer product `a_h[:, r] a_w[:, r]`: the same
  numbers (a separable kernel; the zero padding commutes), one op and one pass over the
  activation fewer, `d_h d_w` multiply-adds per channel and position where `_cp_macs`
  counts the pipeline's `d_h + d_w`. Measured (ResNet-32 CP step, 2-core CPU, both
  compiled in one process, timed round-robin): batch 32 101.6 ms against 120.8 with two
  oneDNN depthwise convs, batch 128 313.3 against 334.4.
  """
  ph, pw = _split_pads(x.shape, (p["a_h"].shape[0], p["a_w"].shape[0]), strides, padding)
  y = ops.contract("nhws,sr->nhwr", x, p["a_s"])
  if ops.current_conv_backend() == "onednn" and x.dtype == jnp.float32:
    k = (p["a_h"][:, None, :] * p["a_w"][None, :, :])[:, :, None, :]  # (d_h, d_w, 1, R)
    y = ops.conv(y, k, strides=strides, padding=(ph, pw), groups=rank)
    return ops.contract("nhwr,tr->nhwt", y, p["a_t"])
  y = ops.depthwise_1d(y, p["a_h"], axis=1, stride=strides[0], pad=ph)  # d_h x 1
  y = ops.depthwise_1d(y, p["a_w"], axis=2, stride=strides[1], pad=pw)  # 1 x d_w
  return ops.contract("nhwr,tr->nhwt", y, p["a_t"])


def _cp_macs(xs, ws, rank, strides, padding):
  n, h, w, s = xs
  d_h, d_w, _, t = ws
  ho, wo = _hw_out(xs, ws[:2], strides, padding)
  return (
    n * h * w * s * rank
    + n * ho * w * d_h * rank
    + n * ho * wo * d_w * rank
    + n * ho * wo * rank * t
  )


def _cp_decompose(kernel, rank):
  f, _ = decomp.cp_als(kernel, rank)
  a_h, a_w, a_s, a_t = f.factors
  return {"a_s": a_s, "a_h": a_h, "a_w": a_w, "a_t": a_t * f.weights[None]}


CP = Kind("cp", _cp_shapes, _cp_kernel, _cp_apply, _cp_macs, _cp_decompose, lambda rank: rank)


# --- tr / tt: the RSDTR pipeline --------------------------------------------------------


def _tr_shapes(ws, ranks):
  d_h, d_w, s, t = ws
  r0, r1, r2, r3 = ranks
  return {"g0": (r0, s, r1), "g1": (r1, d_h, r2), "g2": (r2, d_w, r3), "g3": (r3, t, r0)}


def _tr_kernel(p, ws, ranks):
  ring = decomp.reconstruct(decomp.TR((p["g0"], p["g1"], p["g2"], p["g3"])))
  return jnp.transpose(ring, KERNEL_AXES)


def _tr_apply(x, p, ranks, strides, padding):
  """The ring rank `R0` is folded into the batch: the first 1x1 gives `(N, R0, H, W, R1)`,
  read as `N R0` images of `R1` channels; plain `(d_h x 1)` and `(1 x d_w)` convs run on
  them; the last 1x1 contracts `R0` and `R3` back. No grouped conv (XLA runs grouped convs
  slowly, on CPU by an order of magnitude) and no 3-D conv over a ring axis.

  Inside `conv_backend("onednn")` (float32) `R0` stays in the channels instead: the 1x1s
  are oneDNN 1x1 convs on `(N, H, W, R0 R1)` and `(N, H', W', R0 R3)`, and the two middle
  convs are grouped convs with `R0` groups whose kernels are the core repeated per group
  (the same numbers and multiply-adds; no transposes of the activations, where folding
  `R0` into the batch moved every activation twice and left oneDNN convs of 3-8 channels).
  Measured (ResNet-32 TR step, 2-core CPU, the three variants compiled in one process and
  timed round-robin): batch 32 122-129 ms against 131-136 folded (and 129-131 with one
  block-diagonal dense conv per middle conv); batch 128 360 against 379 ms.

  Under oneDNN the pipeline's narrow convs are padded to 16-channel blocks (a grouped conv
  of 3 channels a group runs at a twenty-eighth of its arithmetic): where `_tr_paired` says
  so, the cores are contracted pairwise first and the layer runs as two convs
  (`_tr_apply_paired`).
  """
  r0, r1, r2, r3 = ranks
  n, h, w, _ = x.shape
  ph, pw = _split_pads(x.shape, (p["g1"].shape[1], p["g2"].shape[1]), strides, padding)
  if ops.current_conv_backend() == "onednn" and x.dtype == jnp.float32:
    ws = (p["g1"].shape[1], p["g2"].shape[1], x.shape[3], p["g3"].shape[1])
    if _tr_paired(x.shape, ws, ranks, strides, (ph, pw)):
      return _tr_apply_paired(x, p, ranks, strides, (ph, pw))
    g0 = jnp.transpose(p["g0"], (1, 0, 2)).reshape(x.shape[3], r0 * r1)  # (S, R0 R1)
    y = ops.contract("nhws,sc->nhwc", x, g0)  # channels (R0, R1)
    k1 = jnp.tile(jnp.transpose(p["g1"], (1, 0, 2)), (1, 1, r0))  # (d_h, R1, R0 R2)
    y = _conv_h(y, k1, strides, ph, groups=r0)  # channels (R0, R2)
    k2 = jnp.tile(jnp.transpose(p["g2"], (1, 0, 2)), (1, 1, r0))  # (d_w, R2, R0 R3)
    y = _conv_w(y, k2, strides, pw, groups=r0)  # channels (R0, R3)
    g3 = jnp.transpose(p["g3"], (2, 0, 1)).reshape(r0 * r3, -1)  # (R0 R3, T)
    return ops.contract("nhwc,ct->nhwt", y, g3)
  y = ops.contract("nhws,asb->nahwb", x, p["g0"]).reshape(n * r0, h, w, r1)
  y = _conv_h(y, jnp.transpose(p["g1"], (1, 0, 2)), strides, ph)  # (d_h, R1, R2)
  y = _conv_w(y, jnp.transpose(p["g2"], (1, 0, 2)), strides, pw)  # (d_w, R2, R3)
  y = y.reshape(n, r0, *y.shape[1:3], r3)
  return ops.contract("nahwd,dta->nhwt", y, p["g3"])


# oneDNN's convs on AVX-512 compute channels in blocks of 16 floats (a 9-channel conv costs
# what a 16-channel one does; a grouped conv pads each group's channels to a block).
_ONEDNN_BLOCK = 16
# How much more padded multiply-adds the paired TR form may cost and still be taken: it
# runs two convs where the pipeline runs four (two calls, two intermediate activations
# written and read, fewer tiny ops fewer); see `_tr_paired`.
_PAIRED_SLACK = 1.25


def _tr_paired(x_shape, ws, ranks, strides, padding) -> bool:
  """Whether a TR layer under `conv_backend("onednn")` runs paired (`_tr_apply_paired`)
  rather than as the four-conv pipeline: when its multiply-adds, every conv's channels
  rounded up to oneDNN's block (per group for the grouped convs), are at most
  `_PAIRED_SLACK` times the pipeline's (`_tr_macs` with the same rounding).

  Measured (ResNet-32 train step at 25%, 2-core AVX-512 CPU, variants compiled in one process
  and timed round-robin, per stage 16/32/64 channels; P paired, F four convs):
  TR (ranks 3/5/8) batch 32: FFF 98.6, PPP 86.6, PPF 85.2 ms (dense 84.9); batch 128: FFF
  297.0, PPP 256.0, PPF 249.7 (dense 287.5). TT (ranks 7/14/29) batch 32: FFF 76.4, PFF
  73.3, PPF 70.5, PPP 71.1 (dense 83.7). The padded count alone picks PPF for TR and PFF
  for TT; the slack (the two convs the paired form saves) picks PPP for both, within 2.5%
  of the best measured for TR and the best for TT.
  """
  r0, _, r2, _ = ranks
  n, _, w, s = x_shape
  d_h, d_w, _, t = ws
  ho, wo = _hw_out(x_shape, (d_h, d_w), strides, padding)
  b = _round_up(_ONEDNN_BLOCK)
  paired = n * (ho * w * d_h * b(s) * b(r0 * r2) + ho * wo * d_w * b(r0 * r2) * b(t))
  return paired <= _PAIRED_SLACK * _tr_macs(
    x_shape, ws, ranks, strides, padding, block=_ONEDNN_BLOCK
  )


def _tr_apply_paired(x, p, ranks, strides, pads):
  """The TR layer as two convs: the ring's cores contracted pairwise first, `g0 g1` into a
  `d_h x 1` kernel `S -> (R0, R2)` and `g2 g3` into a `1 x d_w` kernel `(R0, R2) -> T`
  (`R1` and `R3` summed inside the kernels, `R0` carried in the channels). The same
  function as the pipeline, another order of the same contraction; the gradients reach the
  cores through the two small kernel products."""
  r0, _, r2, _ = ranks
  ph, pw = pads
  d_h, d_w = p["g1"].shape[1], p["g2"].shape[1]
  k_h = jnp.einsum("asr,rhq->hsaq", p["g0"], p["g1"], precision=_HI)
  y = _conv_h(x, k_h.reshape(d_h, x.shape[3], r0 * r2), strides, ph)  # channels (R0, R2)
  k_w = jnp.einsum("qwd,dta->waqt", p["g2"], p["g3"], precision=_HI)
  return _conv_w(y, k_w.reshape(d_w, r0 * r2, -1), strides, pw)


def _round_up(block: int):
  """Channel counts rounded up to a multiple of `block`."""
  return lambda c: -(-c // block) * block


def _tr_macs(xs, ws, ranks, strides, padding, block: int = 1):
  """The four-conv pipeline's multiply-adds; with `block` every conv's channels rounded up
  to it (per group for the middle convs), as oneDNN computes them (`_tr_paired`)."""
  n, h, w, s = xs
  d_h, d_w, _, t = ws
  r0, r1, r2, r3 = ranks
  ho, wo = _hw_out(xs, ws[:2], strides, padding)
  b = _round_up(block)
  return n * (
    h * w * b(s) * b(r0 * r1)
    + ho * w * d_h * r0 * b(r1) * b(r2)
    + ho * wo * d_w * r0 * b(r2) * b(r3)
    + ho * wo * b(r0 * r3) * b(t)
  )


def tr_params(tr: decomp.TR) -> dict:
  """A TR (or TT) of the ring `(S, d_h, d_w, T)` as the TR layers' params `g0..g3`."""
  return dict(zip(("g0", "g1", "g2", "g3"), tr.cores, strict=True))


def tr_decompose(kernel, ranks, shift: int = 0) -> dict:
  """TR-SVD of the ring `(S, d_h, d_w, T)` of an HWIO kernel, the sweep started at ring
  mode `shift` (RSDTR's winner; 0 is the plain TR-SVD), the cores rotated back into ring
  order: the TR layers' params `g0..g3`. `ranks` are `(R0, R1, R2, R3)` in ring order."""
  ring = jnp.transpose(kernel, RING_AXES)
  order = [(shift + k) % 4 for k in range(4)]
  tr = decomp.tr_svd(jnp.transpose(ring, order), ranks=tuple(ranks[i] for i in order))
  cores = [None] * 4
  for k, i in enumerate(order):
    cores[i] = tr.cores[k]
  return tr_params(decomp.TR(tuple(cores)))


def _tr_decompose(kernel, ranks):
  return tr_decompose(kernel, ranks, 0)


def _tt_decompose(kernel, ranks):
  return tr_params(decomp.tt_svd(jnp.transpose(kernel, RING_AXES), ranks=ranks[1:]))


TR = Kind("tr", _tr_shapes, _tr_kernel, _tr_apply, _tr_macs, _tr_decompose, math.prod)
TT = TR._replace(name="tt", decompose=_tt_decompose)


# --- m-forms: TNN's reshaped higher-order weights ---------------------------------------


class MHyper(NamedTuple):
  """Static hyper-parameters of an m-form.

  `in_modes` `(s_1..s_m)` factor S (row-major), `out_modes` `(t_1..t_m)` factor T.
  `ranks`: `mcp` one int `R`; `mtk` `(r_1..r_m, r_sp)` (conv) or `(r_1..r_m)` (dense);
  `mtt`/`mtr` `(R_0, ..., R_m)` for a conv (`R_0 = 1` for `mtt`) or `(R_0..R_{m-1})`
  for a dense layer, ring closing back to `R_0`.
  """

  in_modes: tuple
  out_modes: tuple
  ranks: Any


_S = "abcdefgh"  # input modes s_k
_T = "ijklmnop"  # output modes t_k
_R = "qrsuvwxy"  # ranks (z is the spatial rank / CP rank)


def _m_letters(m):
  return _S[:m], _T[:m], _R[: m + 1]


def _mform(form: str, conv: bool) -> Kind:
  """An m-form (Su et al. 2022, section 4): S = s_1..s_m and T = t_1..t_m are reshaped
  into m modes, mode k pairing (s_k, t_k) (as in a TT-matrix), and the higher-order weight
  `W (s_1 t_1, ..., s_m t_m[, d_h d_w])` is decomposed (`form`: CP, Tucker, TT, TR).

  Our reading: the spatial mode is one more mode of the decomposition, last (the ring
  closes through it). The forward contracts the input's m channel modes with the channel
  factors first, giving `(N, H, W, t_1..t_m, Q)`; then the spatial factor `(d_h, d_w, Q)`
  is applied to every `t` (it is shared across output channels, as the decomposition
  says) as one plain conv `Q -> 1` over the batch `N T`. Factors keep `s_k` and `t_k` as separate
  axes: `(R_{k-1}, s_k, t_k, R_k)`, `(s_k, t_k, R)`, `(s_k, t_k, r_k)`.
  """

  def shapes(ws, hp):
    m = len(hp.in_modes)
    st = list(zip(hp.in_modes, hp.out_modes, strict=True))
    out = {}
    if form == "cp":
      for k, (s, t) in enumerate(st):
        out[f"a{k}"] = (s, t, hp.ranks)
      if conv:
        out["a_sp"] = (*ws[:2], hp.ranks)
    elif form == "tk":
      for k, (s, t) in enumerate(st):
        out[f"u{k}"] = (s, t, hp.ranks[k])
      out["core"] = tuple(hp.ranks)
      if conv:
        out["u_sp"] = (*ws[:2], hp.ranks[m])
    else:
      r = hp.ranks
      for k, (s, t) in enumerate(st):
        out[f"g{k}"] = (r[k], s, t, r[(k + 1) % len(r)])
      if conv:
        out["g_sp"] = (r[m], *ws[:2], r[0])
    return out

  def channel_spec(hp):
    """`contract` spec taking x `(N, H, W, s_1..s_m)` to `(N, H, W, t_1..t_m, Q..)`, the
    param names it contracts in order, and the spatial factor's name and subscripts
    (`Q..` are its rank letters; none for a dense layer)."""
    m = len(hp.in_modes)
    s, t, r = _m_letters(m)
    if form == "cp":
      terms = [(f"a{k}", s[k] + t[k] + "z") for k in range(m)]
      q, sp = "z", ("a_sp", "HWz")
    elif form == "tk":
      terms = [(f"u{k}", s[k] + t[k] + r[k]) for k in range(m)]
      terms.append(("core", r[: m + 1] if conv else r[:m]))
      q, sp = r[m], ("u_sp", "HW" + r[m])
    else:
      nr = len(hp.ranks)
      terms = [(f"g{k}", r[k] + s[k] + t[k] + r[(k + 1) % nr]) for k in range(m)]
      q, sp = r[m] + r[0], ("g_sp", r[m] + "HW" + r[0])
    if not conv:
      q, sp = "", None
    spec = ",".join(["NHW" + s] + [sub for _, sub in terms]) + "->NHW" + t + q
    return spec, [name for name, _ in terms], sp

  def spatial(p, hp):
    """The spatial factor as `(d_h, d_w, Q)`, `Q` in the order `channel_spec` leaves it."""
    if form in ("cp", "tk"):
      return p["a_sp" if form == "cp" else "u_sp"]
    g = p["g_sp"]  # (R_m, d_h, d_w, R_0)
    return jnp.transpose(g, (1, 2, 0, 3)).reshape(*g.shape[1:3], -1)

  def kernel(p, ws, hp):
    spec, names, sp = channel_spec(hp)
    s, t, _ = _m_letters(len(hp.in_modes))
    subs = spec.split("->")[0].split(",")[1:]
    operands = [p[k] for k in names]
    if conv:
      subs.append(sp[1])
      operands.append(p[sp[0]])
    # Letters not in the output are summed, which closes a dense ring through R_0.
    full = jnp.einsum(
      ",".join(subs) + "->" + ("HW" if conv else "") + s + t, *operands, precision=_HI
    )
    return full.reshape(*ws[:-2], math.prod(hp.in_modes), math.prod(hp.out_modes))

  def apply(x, p, hp, strides, padding):
    spec, names, _ = channel_spec(hp)
    x = x.reshape(*x.shape[:-1], *hp.in_modes)
    if not conv:  # dense: x is (N, S); give it unit spatial modes for one code path
      x = x.reshape(x.shape[0], 1, 1, *hp.in_modes)
    y = ops.contract(spec, x, *[p[k] for k in names])
    n, h, w = y.shape[:3]
    t = math.prod(hp.out_modes)
    if not conv:
      return y.reshape(n, t)
    sp = spatial(p, hp)
    q = sp.shape[-1]
    # The spatial factor is shared by every t: fold T into the batch and run one plain
    # conv Q -> 1 on N T images (no T-grouped conv, which XLA runs slowly).
    y = jnp.moveaxis(y.reshape(n, h, w, t, q), 3, 1).reshape(n * t, h, w, q)
    y = ops.conv(y, sp[..., None], strides=strides, padding=padding)  # (N T, H', W', 1)
    return jnp.moveaxis(y.reshape(n, t, *y.shape[1:3]), 1, 3)

  def macs(xs, ws, hp, strides, padding):
    spec, names, sp = channel_spec(hp)
    sh = shapes(ws, hp)
    n, h, w = (xs[0], xs[1], xs[2]) if conv else (xs[0], 1, 1)
    total = ops.contract_macs(spec, (n, h, w, *hp.in_modes), *[sh[k] for k in names])
    if conv:
      t = math.prod(hp.out_modes)
      q = math.prod(sh[sp[0]]) // (ws[0] * ws[1])
      total += ops.conv_macs((n, h, w, t * q), (*ws[:2], q, t), strides=strides, padding=padding)
    return total

  def higher_order(wt, hp):
    """`W (s_1 t_1, ..., s_m t_m[, d_h d_w])` from a weight (HWIO or `(S, T)`)."""
    m = len(hp.in_modes)
    if conv:
      d_h, d_w = wt.shape[:2]
      x = wt.reshape(d_h * d_w, *hp.in_modes, *hp.out_modes)
      perm = [a for k in range(m) for a in (1 + k, 1 + m + k)] + [0]
    else:
      x = wt.reshape(*hp.in_modes, *hp.out_modes)
      perm = [a for k in range(m) for a in (k, m + k)]
    x = jnp.transpose(x, perm)
    return x.reshape(
      *[s * t for s, t in zip(hp.in_modes, hp.out_modes, strict=True)], *x.shape[2 * m :]
    )

  def decompose(wt, hp):
    m = len(hp.in_modes)
    x = higher_order(wt, hp)
    st = list(zip(hp.in_modes, hp.out_modes, strict=True))
    d = wt.shape[:2] if conv else None
    if form == "cp":
      f, _ = decomp.cp_als(x, hp.ranks)
      out = {f"a{k}": f.factors[k].reshape(s, t, -1) for k, (s, t) in enumerate(st)}
      lam = f.weights
      if conv:
        out["a_sp"] = (f.factors[m] * lam[None]).reshape(*d, -1)
      else:
        out["a0"] = out["a0"] * lam[None, None]
      return out
    if form == "tk":
      f = decomp.hosvd(x, hp.ranks)
      out = {f"u{k}": f.factors[k].reshape(s, t, -1) for k, (s, t) in enumerate(st)}
      out["core"] = f.core
      if conv:
        out["u_sp"] = f.factors[m].reshape(*d, -1)
      return out
    cores = (
      decomp.tt_svd(x, ranks=hp.ranks[1:]).cores
      if form == "tt"
      else decomp.tr_svd(x, ranks=hp.ranks).cores
    )
    out = {f"g{k}": cores[k].reshape(cores[k].shape[0], s, t, -1) for k, (s, t) in enumerate(st)}
    if conv:
      g = cores[m]
      out["g_sp"] = g.reshape(g.shape[0], *d, g.shape[-1])
    return out

  def terms(hp):
    if form == "cp":
      return hp.ranks
    return math.prod(hp.ranks)

  return Kind(("m" if conv else "dense_m") + form, shapes, kernel, apply, macs, decompose, terms)


MCP, MTK, MTT, MTR = (_mform(f, conv=True) for f in ("cp", "tk", "tt", "tr"))
DENSE_CP, DENSE_TK, DENSE_TT, DENSE_TR = (_mform(f, conv=False) for f in ("cp", "tk", "tt", "tr"))
