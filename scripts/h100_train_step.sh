#!/usr/bin/env bash
# Training-step figures (issue 5) scored as gma6 train scores (next-token loss at 32 positions a
# segment), memory-only vs full fine-tune, and the memory trained on a 4-bit base.
set -uo pipefail
source scripts/h100_env.sh
timeout 200 python3 benchmarks/run_bench.py --model $M --system memory -c 1k -b 1 -s 512 --train-context 4k \
  --train-batch 8 --train-segment 512 --train-positions 32 --out $OUT/bench-train-positions.json 2>&1 | grep -E "train|wrote"
timeout 150 python3 benchmarks/options_check.py --model $M --train-only --out $OUT/options-train.json 2>&1 | grep -v Loading | tail -5
