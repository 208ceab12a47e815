#!/usr/bin/env bash
# Call C: speed and footprint on the H100 (issue 5), alone on the machine: gma6 bench, then the
# system options measured against fp32 with the adapter ADAPTER_RUN trained in call A.
set -uo pipefail
source scripts/h100_env.sh
a=/tmp/runs/${1:-g4}/adapter; [ -d $a ] || a=/tmp/runs/${1:-g4}/checkpoint
# bf16 base as issue 5's targets ask (session 2 ran this in fp32 by the bench's default; see results/).
timeout ${BENCH_SECONDS:-300} python3 benchmarks/run_bench.py --model $M --dtype ${BENCH_DTYPE:-bfloat16} \
  -c 1k -c 4k -c 16k -c 32k -c 64k -c 128k -b 1 -b 8 -s 512 -s 1024 --repeats 3 --max-seconds 20 \
  --train-context 4k --train-batch 8 --train-positions 32 --paired 32 --out $OUT/bench-gpu-${BENCH_DTYPE:-bfloat16}.json 2>&1 | tr '\r' '\n' | grep -v -E "^(Loading|bench)" | tail -60
timeout ${OPTIONS_SECONDS:-150} python3 benchmarks/options_check.py --model $M --adapter $a --samples 20 \
  --out $OUT/options-h100.json 2>&1 | grep -v Loading | tail -12
