"""One 3x3 conv, forward and both gradients, in three layouts: is NHWC/HWIO the CPU's best?

  python -m benchmarks.conv_layout [--repeats 15] [--out benchmarks/results/conv_layout-cpu.jsonl]

Our models run NHWC images through HWIO kernels (Flax's layout). XLA lowers a conv's weight
gradient as a conv with the batch and feature dims swapped, and the transposes it inserts
for that cost about a sixth of our CPU train step (README, "where the time goes"). This
measures whether another order helps: the same conv (`SAME`, stride 1, C -> C channels, a
ReLU-square loss so the backward pass has an elementwise chain to fuse) in NHWC/HWIO (ours),
NCHW/OIHW (PyTorch's order) and NCHW/HWIO, on the ResNet-32 stage shapes. The arms are
jitted, compiled apart and timed round-robin (`common.timeit_interleaved`), median of
`--repeats`. Each row names the device; `vs_ours` is our layout's time over the arm's.
"""

from __future__ import annotations

import argparse
import datetime

import jax
import jax.numpy as jnp
from jax import lax

import decomp
from benchmarks import common

LAYOUTS = {
  "NHWC/HWIO": (("NHWC", "HWIO", "NHWC"), (0, 1, 2, 3), (0, 1, 2, 3)),
  "NCHW/OIHW": (("NCHW", "OIHW", "NCHW"), (0, 3, 1, 2), (3, 2, 0, 1)),
  "NCHW/HWIO": (("NCHW", "HWIO", "NCHW"), (0, 3, 1, 2), (0, 1, 2, 3)),
}
SHAPES = ((32, 32, 16), (32, 16, 32), (32, 8, 64), (128, 32, 16), (128, 16, 32), (128, 8, 64))


def loss_and_grads(dimension_numbers):
  """`(x, w) -> (loss, (dx, dw))` for one conv in the given layout, jitted."""

  def loss(x, w):
    y = lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dimension_numbers)
    return jnp.sum(jnp.maximum(y, 0.0) ** 2)

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def operands(n: int, hw: int, c: int, layout: str, seed: int = 0):
  """The same NHWC images and HWIO kernel for every layout, transposed into `layout`."""
  kx, kw = jax.random.split(jax.random.PRNGKey(seed))
  x = jax.random.normal(kx, (n, hw, hw, c), jnp.float32)
  w = jax.random.normal(kw, (3, 3, c, c), jnp.float32) / (3.0 * c**0.5)
  _, px, pw = LAYOUTS[layout]
  return jnp.transpose(x, px), jnp.transpose(w, pw)


def measure(shapes=SHAPES, repeats: int = 15) -> list:
  rows, device = [], common.device_name()
  date = datetime.date.today().isoformat()
  for n, hw, c in shapes:
    fns = {}
    for name, (dn, _, _) in LAYOUTS.items():
      f, (x, w) = loss_and_grads(dn), operands(n, hw, c, name)
      fns[name] = lambda f=f, x=x, w=w: jax.block_until_ready(f(x, w))
    times = common.timeit_interleaved(fns, repeats=repeats, warmup=2)
    ours = times["NHWC/HWIO"]["median_ms"]
    for name, t in times.items():
      rows.append({
        "bench": "conv_layout", "layout": name, "batch": n, "hw": hw, "channels": c,
        "median_ms": t["median_ms"], "first_ms": round(t["first_ms"], 1),
        "repeats": repeats, "vs_ours": ours / t["median_ms"],
        "device": device, "jax": jax.__version__, "date": date,
      })  # fmt: skip
      print(f"{n:4d} {hw:3d}x{hw:<3d} {c:3d}ch  {name:10s} {t['median_ms']:8.2f} ms", flush=True)
  return rows


def main(argv=None) -> list:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--repeats", type=int, default=15)
  p.add_argument("--out", default="", help="append the rows to this .jsonl file")
  a = p.parse_args(argv)
  if a.repeats < 1:
    p.error(f"--repeats must be >= 1, got {a.repeats}")
  decomp.reuse_host_memory()
  rows = measure(repeats=a.repeats)
  if a.out:
    common.write_jsonl(a.out, rows)
  return rows


if __name__ == "__main__":
  main()
