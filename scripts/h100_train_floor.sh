#!/usr/bin/env bash
# Issue 5's training-step comparison with its floor (`train_frozen`: the frozen base's own forward and backward,
# the adapter free) on the lent GPU, after scripts/h100_prepare.sh on the same warm machine. Writes to $OUT:
# bench-h100-bf16-train-floor.json (the default adapter), -checkpointing.json (both steps recompute activations)
# and -memory-alone.json (the -memory-alone adapter).
set -uo pipefail
source scripts/h100_env.sh
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
A=src/gma6/adapters/gemma3-270m-babilong
common="--model $M --dtype bfloat16 -c 1k -b 8 -s 1024 --system base_segments --system memory --repeats 2
 --train-context 4k --train-batch 8 --train-positions 32 --train-warmup 2"
python3 benchmarks/run_bench.py $common --adapter $A --out $OUT/bench-h100-bf16-train-floor.json 2>&1 | grep -E "train_|ratio"
python3 benchmarks/run_bench.py $common --adapter $A --train-checkpointing \
  --out $OUT/bench-h100-bf16-train-floor-checkpointing.json 2>&1 | grep -E "train_|ratio"
python3 benchmarks/run_bench.py $common --adapter $A-memory-alone \
  --out $OUT/bench-h100-bf16-train-floor-memory-alone.json 2>&1 | grep -E "train_|ratio"
