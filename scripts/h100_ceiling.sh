#!/usr/bin/env bash
# The in-context ceiling (issue 4): LoRA alone, the whole context in the base's window, memory off
# (`gma6 train --in-context`). Runs side by side, then teacher-forced validation of each on test seeds.
# Usage: STEPS=100 TRAIN_SECONDS=300 CURRICULUM=1,2,4,8 VAL_LENGTHS=1k,4k VAL_N=100 \
#        bash scripts/h100_ceiling.sh "c1=--tasks qa1" "c2=--tasks qa1,qa2,qa3,qa4,qa5"
set -uo pipefail
source scripts/h100_env.sh
S=${STEPS:-100}; T=${TRAIN_SECONDS:-300}
common="--model $M --segment-length 256 --curriculum ${CURRICULUM:-1,2,4,8} --steps-per-stage $S --batch-size 32
 --lr 1e-3 --lora-rank 8 --in-context --time-limit $T --checkpoint-every 50 --log-every 10 --workers 3 --seed 0"
names=()
for spec in "$@"; do
  n=${spec%%=*}; opts=${spec#*=}; names+=("$n")
  python3 -m gma6.cli train --out /tmp/runs/$n $common $opts >> /tmp/runs/$n.log 2>&1 &
done
wait
for n in "${names[@]}"; do
  echo "== $n"; tr '\r' '\n' < /tmp/runs/$n.log | grep -E "done|stopped|trainable|Error" | tail -3; tail -2 /tmp/runs/$n/log.jsonl
  a=/tmp/runs/$n/adapter; [ -d $a ] || a=/tmp/runs/$n/checkpoint
  python3 scripts/validate_adapter.py --model $M --adapter $a --in-context --lengths ${VAL_LENGTHS:-1k,4k} \
    --n ${VAL_N:-100} --out $OUT/$n-validate.json 2>&1 | grep -v Loading &
done
wait
for n in "${names[@]}"; do cp /tmp/runs/$n/log.jsonl $OUT/$n-log.jsonl; done
