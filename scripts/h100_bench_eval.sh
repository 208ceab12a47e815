#!/usr/bin/env bash
# After scripts/h100_base_read_runs.sh on the same warm machine, in ONE call: the H100 bench (bf16) of the shipped
# default's kind (read_site residual, reading only, batch 8, segment 1024) and of run BENCH_RUN's kind (full:
# contexts to 128k, the training step), then gma6 eval of the named runs (parallel processes).
# Usage: BENCH_RUN=a1 [BENCH_SECONDS=270] [EVAL_SECONDS=230] [EVAL_LENGTHS=1k,4k,32k] [EVAL_SAMPLES=100,100,25]
#        bash scripts/h100_bench_eval.sh NAME...
# Leaves in $OUT: bench-h100-bf16-shipped.json, bench-h100-bf16-$BENCH_RUN.json (+ plots), NAME.json.
set -uo pipefail
source scripts/h100_env.sh
a=/tmp/runs/$BENCH_RUN/adapter; [ -d $a ] || a=/tmp/runs/$BENCH_RUN/checkpoint
bench="python3 benchmarks/run_bench.py --model $M --dtype bfloat16 --repeats 3 --max-seconds 20 --paired 32"
timeout 90 $bench -c 4k -b 8 -s 1024 --no-train --adapter src/gma6/adapters/gemma3-270m-babilong \
  --out $OUT/bench-h100-bf16-shipped.json 2>&1 | tr '\r' '\n' | grep -E "ratio|memory|paired|wrote" | tail -8
timeout ${BENCH_SECONDS:-270} $bench -c 1k -c 4k -c 32k -c 128k -b 1 -b 8 -s 1024 --train-context 4k --train-batch 8 \
  --train-positions 32 --adapter $a --out $OUT/bench-h100-bf16-$BENCH_RUN.json 2>&1 | tr '\r' '\n' \
  | grep -v -E "^(Loading|bench)" | tail -40
EVAL_SECONDS=${EVAL_SECONDS:-230} EVAL_LENGTHS=${EVAL_LENGTHS:-1k,4k,32k} EVAL_SAMPLES=${EVAL_SAMPLES:-100,100,25} \
  bash scripts/h100_eval_pair.sh "$@"
