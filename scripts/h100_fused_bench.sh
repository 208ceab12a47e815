#!/usr/bin/env bash
# H100 bench (bf16) of the shipped default's kind (read_site="attention", 17 memory layers): contexts 1k-128k,
# batch 1 and 8, segment 1024, the training step; then the same kind with every other layer (9 memory layers;
# its config only: the bench times a kind, not trained weights), reading at 4k, batch 8, segment 1024.
# Usage (after scripts/h100_prepare.sh on the same warm machine): [NAME=attention] [NINE=1] bash scripts/h100_fused_bench.sh
# (NAME names the results, bench-h100-bf16-NAME.json; NINE=0 leaves the 9-layer bench out)
set -uo pipefail
source scripts/h100_env.sh
bench="python3 benchmarks/run_bench.py --model $M --dtype bfloat16 --repeats 3 --max-seconds 20 --paired 32"
timeout ${BENCH_SECONDS:-280} $bench -c 1k -c 4k -c 32k -c 128k -b 1 -b 8 -s 1024 --train-context 4k --train-batch 8 \
  --train-positions 32 --adapter src/gma6/adapters/gemma3-270m-babilong --out $OUT/bench-h100-bf16-${NAME:-attention}.json 2>&1 \
  | tr '\r' '\n' | grep -v -E "^(Loading|bench)" | tail -32
[ "${NINE:-1}" = 0 ] && exit 0
mkdir -p /tmp/k9
python3 -c "
import json; c = json.load(open('src/gma6/adapters/gemma3-270m-babilong/gma6_config.json'))
c['layers'] = list(range(0, 17, 2)); json.dump(c, open('/tmp/k9/gma6_config.json', 'w'))"
timeout 90 $bench -c 4k -b 8 -s 1024 --no-train --adapter /tmp/k9 --out $OUT/bench-h100-bf16-attention-9layers.json 2>&1 \
  | tr '\r' '\n' | grep -E "ratio|memory|paired|wrote" | tail -6
