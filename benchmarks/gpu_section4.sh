#!/usr/bin/env bash
# Issue 4, section 4 at full length (train/configs/section4.py:resnet20) on the GPU machine,
# spread over device calls of at most 10 minutes: each call trains until its time is up,
# and the next resumes from the workdir the previous one returned (the CLI resumes a
# workdir; a run stopped at any moment loses at most the steps since its last checkpoint).
#
# Here, once: the wheels and the data of benchmarks/gpu.sh's header (.whl: ml_collections
# for the CLI, threadpoolctl; flax brings orbax, absl and yaml there; .data: Fashion-MNIST),
# and .s4 listed in .git/info/exclude beside .whl and .data.
# First device call (carry: .data, .whl):
#   bash benchmarks/gpu_section4.sh "$OUT"
# Then, after each call, here: rm -rf .s4 && cp -r <files_at>/s4 .s4
# Next device calls (carry: .data, .whl, .s4), until $OUT/s4/results.json exists:
#   bash benchmarks/gpu_section4.sh "$OUT" .s4
# The config (default resnet20), the seconds per call, extra flags and the interpreter:
#   S4_CONFIG=resnet32 S4_SECONDS=540 S4_ARGS="--config.checkpoint_every=500" PYTHON=python3
set -euo pipefail
out="${1:?usage: bash benchmarks/gpu_section4.sh OUT_DIR [PREVIOUS_WORKDIR]}"
prev="${2:-}"
py="${PYTHON:-python3}"
mkdir -p "$out/s4"
if [ -n "$prev" ]; then
  cp -r "$prev"/. "$out/s4"/
fi
site=""
if ls .whl/*.whl >/dev/null 2>&1; then
  site="$(mktemp -d)"  # outside $OUT: it does not come back
  "$py" -m pip install -q --no-index --no-deps --target "$site" .whl/*.whl
fi
export PYTHONPATH=".${site:+:$site}" PYTHONUNBUFFERED=1
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name --format=csv,noheader
fi
status=0
# shellcheck disable=SC2086  # S4_ARGS holds several flags
timeout --signal=TERM "${S4_SECONDS:-540}" "$py" -m train \
  --config "train/configs/section4.py:${S4_CONFIG:-resnet20}" --workdir "$out/s4" \
  --config.data_dir=.data/fashion-mnist ${S4_ARGS:-} || status=$?
if [ "$status" -eq 124 ]; then
  echo "time is up: run this script again with the returned workdir to resume"
elif [ "$status" -ne 0 ]; then
  exit "$status"
fi
