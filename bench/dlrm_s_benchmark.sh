#!/usr/bin/env bash
# The reference's CPU benchmark on random data: 8 tables of 1M rows, dim 64, batch 2048.
# Prints the best ms/it of the run (the reference's script parsed a stale log format).
#   bash bench/dlrm_s_benchmark.sh ["--num-batches=100"]
set -euo pipefail
cd "$(dirname "$0")/.."
dlrm_extra_option=${1:-""}
log=model1_CPU_PT_$(nproc).log
# shellcheck disable=SC2086
python dlrm_s_pytorch.py --mini-batch-size=2048 --test-mini-batch-size=16384 --test-num-workers=0 \
  --num-batches=1000 --data-generation=random --arch-mlp-bot=512-512-64 --arch-mlp-top=1024-1024-1024-1 \
  --arch-sparse-feature-size=64 \
  --arch-embedding-size=1000000-1000000-1000000-1000000-1000000-1000000-1000000-1000000 \
  --num-indices-per-lookup=100 --arch-interaction-op=dot --numpy-rand-seed=727 --print-freq=100 \
  --print-time $dlrm_extra_option 2>&1 | tee "$log"
# "Finished training it 100/1000 of epoch 0, 380.12 ms/it, loss ...": the ms/it value is field 8.
best=$(grep "Finished training it" "$log" | awk '{print $8}' | sort -n | head -1)
echo "Min time per iteration: ${best} ms"
