#!/usr/bin/env bash
# The in-context ceiling (issue 4): LoRA alone, the whole context in the base's window, memory off
# (`gma6 train --in-context`), trained side by side by h100_train_runs.sh; then teacher-forced
# validation of each on test seeds (scripts/validate_adapter.py --in-context).
# Usage: STEPS=100 TRAIN_SECONDS=300 CURRICULUM=1,2,4,8 VAL_LENGTHS=1k,4k VAL_N=100 \
#        bash scripts/h100_ceiling.sh "c1=--tasks qa1" "c2=--tasks qa1,qa2,qa3,qa4,qa5"
set -uo pipefail
names=(); specs=()
for spec in "$@"; do names+=("${spec%%=*}"); specs+=("$spec --lora-rank 8 --in-context"); done
EVAL_SECONDS=0 bash scripts/h100_train_runs.sh "${specs[@]}"
source scripts/h100_env.sh >/dev/null
for n in "${names[@]}"; do
  a=/tmp/runs/$n/adapter; [ -d $a ] || a=/tmp/runs/$n/checkpoint
  python3 scripts/validate_adapter.py --model $M --adapter $a --in-context --lengths ${VAL_LENGTHS:-1k,4k} \
    --n ${VAL_N:-100} --out $OUT/$n-validate.json 2>&1 | grep -v Loading &
done
wait
for n in "${names[@]}"; do cp /tmp/runs/$n/log.jsonl $OUT/$n-log.jsonl; done
