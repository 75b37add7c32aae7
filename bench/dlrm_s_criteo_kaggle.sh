#!/usr/bin/env bash
# Criteo Kaggle: put train.txt in ./input/ first. Extra flags are passed through:
#   bash bench/dlrm_s_criteo_kaggle.sh "--nepochs=2"
set -euo pipefail
cd "$(dirname "$0")/.."
dlrm_extra_option=${1:-""}
# The reference runs 16 test loader workers; more than this machine's cores only adds overhead.
test_workers=$(( $(nproc) < 16 ? $(nproc) : 16 ))
# shellcheck disable=SC2086
python dlrm_s_pytorch.py --arch-sparse-feature-size=16 --arch-mlp-bot="13-512-256-64-16" \
  --arch-mlp-top="512-256-1" --data-generation=dataset --data-set=kaggle \
  --raw-data-file=./input/train.txt --processed-data-file=./input/kaggleAdDisplayChallenge_processed.npz \
  --loss-function=bce --round-targets=True --learning-rate=0.1 --mini-batch-size=128 \
  --print-freq=1024 --print-time --test-freq=1024 --test-mini-batch-size=16384 --test-num-workers="$test_workers" \
  $dlrm_extra_option 2>&1 | tee run_kaggle_pt.log
