#!/usr/bin/env bash
# The whole ResNet-20 fidelity study (train/configs/fidelity_resnet20.py: both rates, every
# arm, seed 0) in one device call on a lent GPU.
#
# Here, before the call: the wheels and data of benchmarks/gpu.sh's header (.whl:
# ml_collections for the CLI; .data/fashion-mnist: the four .gz files), carried.
# On the GPU machine, from the repository root:
#   bash benchmarks/fidelity_gpu.sh "$OUT" [STEPS]
# STEPS: each arm's length (default 4800 = 10.2 epochs, a multiple of DeepTwist's SD 200;
# the papers run 80-160 epochs per method, which do not fit one 10-minute call). Rows,
# logs and workdirs come back in $OUT. DATA=DIR points elsewhere for the data; CHECK=1
# writes the rows to fidelity-resnet20-check.json (the check of this script at a tiny
# length on a CPU: `CHECK=1 DATA=/usr/share/datasets/fashion-mnist bash
# benchmarks/fidelity_gpu.sh /tmp/x 6`).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:?usage: bash benchmarks/fidelity_gpu.sh OUT_DIR [STEPS]}"
steps="${2:-4800}"
data="${DATA:-.data/fashion-mnist}"
mkdir -p "$out"
. benchmarks/gpu_env.sh
check=()
if [[ "${CHECK:-}" == 1 ]]; then check=(--check); fi
python3 -c "import jax; print(jax.devices())" | tee "$out/device.txt"
for rate in 0.1 0.2; do
  python3 -m benchmarks.fidelity --study resnet20 --arg "$rate,steps=$steps" --seeds 0 \
    --root "$out/work" --data-dir "$data" "${check[@]}" 2>&1 | tee "$out/resnet20-$rate.log"
done
cp benchmarks/results/fidelity-resnet20*.json "$out/"
