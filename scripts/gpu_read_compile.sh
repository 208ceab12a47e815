#!/usr/bin/env bash
# Reading speed with and without compile_read (session 16), on the lent GPU after scripts/h100_prepare.sh on the same warm
# machine: memory / bare base over the same segments (batch 8 x 1024, 4k context, bf16, 32 alternating pairs) for the
# default's kind (l1) and a7's, eager then compiled; each run its own process. Usage: bash scripts/gpu_read_compile.sh
# [RUNS="l1 l1c a7 a7c"]; writes $OUT/bench-<run>.json and prints each run's paired median.
set -uo pipefail
source scripts/h100_env.sh
L1=src/gma6/adapters/gemma3-270m-babilong-memory-alone
A7=src/gma6/adapters/gemma3-270m-babilong
bench="python3 benchmarks/run_bench.py --model $M --dtype bfloat16 -c 4k -b 8 -s 1024 --system base_segments --system memory
  --repeats 3 --paired 32 --no-train"
for run in ${RUNS:-l1 l1c a7 a7c}; do
  case $run in
    l1) args="--adapter $L1" ;;
    l1c) args="--adapter $L1 --compile-read" ;;
    a7) args="--adapter $A7" ;;
    a7c) args="--adapter $A7 --compile-read" ;;
    *) echo "unknown run $run"; exit 2 ;;
  esac
  t=$(date +%s)
  timeout ${BENCH_SECONDS:-200} $bench $args --out $OUT/bench-$run.json 2>&1 | tr '\r' '\n' | grep -E "paired|throughput|Error|error" | tail -3
  echo "$run done in $(( $(date +%s) - t )) s"
done
