#!/usr/bin/env bash
# Every GPU measurement the open issues ask for, in one device call (~10 min on an H100).
#
# Here, before the call (the GPU machine has no network and, of what this needs beyond
# flax and its dependencies, neither tensorly nor ml_collections nor threadpoolctl):
#   mkdir -p .whl && pip download --no-deps -d .whl tensorly ml-collections threadpoolctl
#   mkdir -p .data && cp -r /usr/share/datasets/fashion-mnist .data/  # for gpu_section4.sh
#   (.whl and .data are listed in .git/info/exclude; name them in the device call's carry)
# On the GPU machine, from the repository root:
#   bash benchmarks/gpu.sh "$OUT"
# Results: $OUT/*.jsonl and $OUT/*.txt (each benchmark's table). Issue 4's full-length
# section-4 run takes more than one call: benchmarks/gpu_section4.sh.
set -euo pipefail
out="${1:?usage: bash benchmarks/gpu.sh OUT_DIR}"
mkdir -p "$out"
. benchmarks/gpu_env.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/device.txt"
# Issue 3: training step vs dense (bf16, batch 1024) and per-layer fwd+bwd.
python3 -m benchmarks.layers --out "$out/layers.jsonl" | tee "$out/layers.txt"
# Issue 2: whole-network decompositions (Tucker-2 distortion < 2 ms, RSDTR ResNet-50 < 1 s).
# The paper's loop is a CPU peer: run on ResNet-32 only (on ResNet-50 it takes minutes).
python3 -m benchmarks.decomp --nets resnet32 --out "$out/decomp.jsonl" | tee "$out/decomp.txt"
python3 -m benchmarks.decomp --nets resnet50 --paper-repeats 0 --out "$out/decomp.jsonl" \
  | tee -a "$out/decomp.txt"
