#!/usr/bin/env bash
# The MLPerf Terabyte configuration: binary files, AUC target 0.8025. Needs day_0 ...
# day_23 in ./input/; `pip install mlperf-logging` for the MLPerf events. Extra flags pass through.
set -euo pipefail
cd "$(dirname "$0")/.."
dlrm_extra_option=${1:-""}
# The reference runs 16 test loader workers; more than this machine's cores only adds overhead.
test_workers=$(( $(nproc) < 16 ? $(nproc) : 16 ))
# shellcheck disable=SC2086
python dlrm_s_pytorch.py --arch-sparse-feature-size=128 --arch-mlp-bot="13-512-256-128" \
  --arch-mlp-top="1024-1024-512-256-1" --max-ind-range=40000000 --data-generation=dataset \
  --data-set=terabyte --raw-data-file=./input/day --processed-data-file=./input/terabyte_processed.npz \
  --loss-function=bce --round-targets=True --learning-rate=1.0 --mini-batch-size=2048 --print-freq=2048 \
  --print-time --test-freq=102400 --test-mini-batch-size=16384 --test-num-workers="$test_workers" --memory-map \
  --mlperf-logging --mlperf-auc-threshold=0.8025 --mlperf-bin-loader --mlperf-bin-shuffle \
  $dlrm_extra_option 2>&1 | tee run_terabyte_mlperf_pt.log
