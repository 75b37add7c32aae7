#!/usr/bin/env bash
# Criteo Terabyte: unzip day_0 ... day_23 into ./input/ first. Extra flags pass through.
set -euo pipefail
cd "$(dirname "$0")/.."
dlrm_extra_option=${1:-""}
# The reference runs 16 test loader workers; more than this machine's cores only adds overhead.
test_workers=$(( $(nproc) < 16 ? $(nproc) : 16 ))
# shellcheck disable=SC2086
python dlrm_s_pytorch.py --arch-sparse-feature-size=64 --arch-mlp-bot="13-512-256-64" \
  --arch-mlp-top="512-512-256-1" --max-ind-range=10000000 --data-generation=dataset --data-set=terabyte \
  --raw-data-file=./input/day --processed-data-file=./input/terabyte_processed.npz \
  --loss-function=bce --round-targets=True --learning-rate=0.1 --mini-batch-size=2048 \
  --print-freq=1024 --print-time --test-freq=10240 --test-mini-batch-size=16384 --test-num-workers="$test_workers" \
  --memory-map --data-sub-sample-rate=0.875 $dlrm_extra_option 2>&1 | tee run_terabyte_pt.log
