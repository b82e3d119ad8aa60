#!/usr/bin/env bash
# The fidelity study on this CPU: the small nets, 3 seeds each, resumable (rerun to go on).
#   bash benchmarks/fidelity.sh [cnn|lenet|all] [seeds]
# Rows: benchmarks/results/fidelity-<study>.json; workdirs under results/fidelity/.
set -euo pipefail
cd "$(dirname "$0")/.."
study="${1:-all}"
seeds="${2:-0,1,2}"
export PYTHONPATH=.
if [[ "$study" == cnn || "$study" == all ]]; then
  python -m benchmarks.fidelity --study cnn --seeds "$seeds"
fi
if [[ "$study" == lenet || "$study" == all ]]; then
  for rate in 0.05 0.1 0.2; do
    python -m benchmarks.fidelity --study lenet --arg "$rate" --seeds "$seeds"
  done
fi
