#!/usr/bin/env bash
# gma6 eval of several adapters at one length on one set of test samples, one parallel process each.
# Usage: [SEED=2] [N=300] [LENGTH=4k] [EVAL_SECONDS=330] bash scripts/h100_eval_4k.sh NAME=ADAPTER_DIR ...
# (ADAPTER_DIR "-" = /tmp/runs/NAME/adapter, else its checkpoint.) Leaves $OUT/NAME-sSEED.json.
# EXTRA_NAME="--question-reads 1" adds flags to NAME's gma6 eval only.
set -uo pipefail
source scripts/h100_env.sh
S=${SEED:-2}; T=${EVAL_SECONDS:-330}; names=()
for spec in "$@"; do
  n=${spec%%=*}; a=${spec#*=}; names+=("$n")
  if [ "$a" = - ]; then a=/tmp/runs/$n/adapter; [ -d $a ] || a=/tmp/runs/$n/checkpoint; fi
  x=EXTRA_$n; extra=${!x:-}
  timeout $T python3 -m gma6.cli eval --model $M --segment-length 256 --out-dir /tmp/ev --no-progress --no-plot \
    --systems memory --batch-size 32 --adapter $a --lengths ${LENGTH:-4k} --samples ${N:-300} --seed $S \
    --name $n-s$S $extra > /tmp/ev/$n-s$S.log 2>&1 &
done
wait
for n in "${names[@]}"; do cp /tmp/ev/$n-s$S.json $OUT/ 2>/dev/null; echo "== $n seed $S"; tail -c 600 /tmp/ev/$n-s$S.log; done
