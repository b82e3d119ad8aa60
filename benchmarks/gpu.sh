#!/usr/bin/env bash
# Every GPU measurement the open issues ask for, in one device call (~10 min on an H100).
#
# Here, before the call (the GPU machine has no network, no tensorly, no tfds):
#   mkdir -p .whl .data && pip download tensorly --no-deps -d .whl
#   cp -r /usr/share/datasets/fashion-mnist .data/       # apt-get install dataset-fashion-mnist
#   (.whl and .data are listed in .git/info/exclude; name them in the device call's carry)
# On the GPU machine, from the repository root:
#   bash benchmarks/gpu.sh "$OUT"
# Results: $OUT/*.jsonl and $OUT/*.txt (each benchmark's table).
set -euo pipefail
out="${1:?usage: bash benchmarks/gpu.sh OUT_DIR}"
mkdir -p "$out" "$out/site"
if ls .whl/tensorly-*.whl >/dev/null 2>&1; then
  pip install -q --no-index --no-deps --target "$out/site" .whl/tensorly-*.whl
fi
export PYTHONPATH=".:$out/site" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/device.txt"
# Issue 3: training step vs dense (bf16, batch 1024) and per-layer fwd+bwd.
python3 -m benchmarks.layers --out "$out/layers.jsonl" | tee "$out/layers.txt"
# Issue 2: whole-network decompositions (Tucker-2 distortion < 2 ms, RSDTR ResNet-50 < 1 s).
python3 -m benchmarks.decomp --nets resnet32,resnet50 --out "$out/decomp.jsonl" | tee "$out/decomp.txt"
