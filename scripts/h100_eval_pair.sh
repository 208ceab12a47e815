#!/usr/bin/env bash
# gma6 eval of adapters trained under /tmp/runs (h100_train_pair.sh, h100_train_runs.sh), on the same
# test samples as the base eval, one parallel process each (merged afterwards with scripts/merge_eval.py).
# Usage: [EVAL_SECONDS=330] [EVAL_LENGTHS=0k,...] [EVAL_SAMPLES=100,...] [EVAL_SYSTEMS=memory,memory_other_context] bash scripts/h100_eval_pair.sh NAME...
set -uo pipefail
source scripts/h100_env.sh
T=${EVAL_SECONDS:-330}
ev="--model $M --lengths ${EVAL_LENGTHS:-0k,1k,2k,4k,8k,16k,32k} --samples ${EVAL_SAMPLES:-100,100,100,100,100,50,25}
 --segment-length 256 --out-dir /tmp/ev --no-progress --systems ${EVAL_SYSTEMS:-memory} --batch-size 32"
for x in "$@"; do
  a=/tmp/runs/$x/adapter; [ -d $a ] || a=/tmp/runs/$x/checkpoint
  timeout $T python3 -m gma6.cli eval $ev --adapter $a --name $x > /tmp/ev/$x.log 2>&1 &
done
wait
for x in "$@"; do cp /tmp/ev/$x.json $OUT/ 2>/dev/null; echo "== eval $x"; tail -c 1500 /tmp/ev/$x.log; done
