"""Reproduces a hang of XLA's CPU runtime (jaxlib 0.10.2, 2-core x86_64, 2026-11-22).

  PYTHONPATH=. timeout 300 python -m benchmarks.repro_cpu_hang

The whole-ResNet-50 Tucker-2 distortion (53 kernels, one jitted graph, kernels of one
shape vmapped: many independent eigh custom calls) is run repeatedly. On the machine
above it stops returning within 60 runs: every XLA worker thread idles in
`Eigen::ThreadPoolTempl::WaitForWork` while the caller waits in `block_until_ready`
(gdb). Not an effect of OpenBLAS threads (OPENBLAS_NUM_THREADS=1 hangs too), nor of async
dispatch (JAX_CPU_ENABLE_ASYNC_DISPATCH=false hangs too). The same distortion of
ResNet-32 (31 kernels) ran thousands of times without a hang; several batched QR calls in
one graph hang the same way, which is why `decomp` calls no QR. Prints "ok" if it
finishes.
"""

import jax

from benchmarks import shapes
from benchmarks.decomp import _kernels, make_distortion


def main(runs: int = 100):
  run, _ = make_distortion(_kernels(shapes.resnet50()), "gram", "tucker2")
  for i in range(runs):
    run()
    print(f"run {i + 1}/{runs}", end="\r", flush=True)
  print(f"\nok: {runs} runs on {jax.devices()[0]}")


if __name__ == "__main__":
  main()
