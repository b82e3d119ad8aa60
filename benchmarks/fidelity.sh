#!/usr/bin/env bash
# The fidelity study on this CPU: the small nets, 3 seeds each, resumable (rerun to go on).
#   bash benchmarks/fidelity.sh [cnn|lenet|all] [seeds]
#   bash benchmarks/fidelity.sh resnet20 [seeds]   # not in "all": ~35-45 min per seed and rate
# Rows: benchmarks/results/fidelity-<study>.json; workdirs under results/fidelity/.
# ResNet-20 runs one arm per CLI run, so each arm's row lands as it finishes, and skips the
# arms that already have a row (a machine without the earlier workdirs carries on).
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
if [[ "$study" == resnet20 ]]; then
  arms=$(python -c "from train.configs import fidelity_resnet20 as f
print(' '.join(m for m in f.get_config('0.1').methods if m != 'dense'))")
  for seed in ${seeds//,/ }; do
    for rate in 0.1 0.2; do
      for arm in $arms; do
        python -m benchmarks.fidelity --study resnet20 --arg "$rate" --seeds "$seed" \
          --methods "$arm" --missing
      done
    done
  done
fi
