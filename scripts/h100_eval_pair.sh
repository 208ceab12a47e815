#!/usr/bin/env bash
# Call B: gma6 eval of the two adapters trained by h100_train_pair.sh, on the same samples as its
# base eval, in parallel processes (merged afterwards with scripts/merge_eval.py).
set -uo pipefail
source scripts/h100_env.sh
T=${EVAL_SECONDS:-330}
ev="--model $M --lengths 0k,1k,2k,4k,8k,16k,32k --samples 100,100,100,100,100,50,25 --segment-length 256
 --out-dir /tmp/ev --no-progress --systems memory --batch-size 32"
for x in "$@"; do
  a=/tmp/runs/$x/adapter; [ -d $a ] || a=/tmp/runs/$x/checkpoint
  timeout $T python3 -m gma6.cli eval $ev --adapter $a --name $x > /tmp/ev/$x.log 2>&1 &
done
wait
for x in "$@"; do cp /tmp/ev/$x.json $OUT/ 2>/dev/null; tail -c 1500 /tmp/ev/$x.log; done
