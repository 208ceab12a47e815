#!/usr/bin/env bash
# Base-read memory trainings side by side, then their teacher-forced validation, in ONE call (a lent machine
# goes back 30 s after a call: nothing is left for a later call to pick up but what is in $OUT).
# Each NAME=OPTIONS adds to b5's recipe (session 6's default; the memory-alone default's training.json lists what its runs
# added); later options override.
# Usage: [STEPS=120] [TRAIN_SECONDS=330] [CURRICULUM=1,2,4] [LENGTHS=1k,4k] [N=100]
#        bash scripts/h100_base_read_runs.sh "m1=--lora-rank 0 --read-rank 8" "b6=--steps-per-stage 200"
# Leaves in $OUT: NAME.tar (adapter or checkpoint, logs) and NAME-validate.json for every run.
set -uo pipefail
source scripts/h100_env.sh
mkdir -p /tmp/runs
B5="--read-rule base --write-rule tokens --memory-dim 0 --slots 128 --tokens-per-segment 64 --token-retention priority
 --usage-decay 0.99 --select-weight 1 --layers 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16 --lora-rank 8
 --kl-weight 1 --lm-positions 8 --questions-per-context 4"
specs=(); names=()
for spec in "$@"; do n=${spec%%=*}; specs+=("$n=$B5 ${spec#*=}"); names+=("$n"); done
STEPS=${STEPS:-120} TRAIN_SECONDS=${TRAIN_SECONDS:-330} CURRICULUM=${CURRICULUM:-1,2,4} \
  bash scripts/h100_train_runs.sh "${specs[@]}"
[ "${N:-100}" = 0 ] && exit 0  # N=0: train only (a later call on the same warm machine resumes or validates)
for n in "${names[@]}"; do
  a=/tmp/runs/$n/adapter; [ -d $a ] || a=/tmp/runs/$n/checkpoint
  python3 scripts/validate_adapter.py --model $M --adapter $a --lengths ${LENGTHS:-1k,4k} --n ${N:-100} \
    --batch-size 32 --out $OUT/$n-validate.json > /tmp/runs/$n-validate.log 2>&1 &
done
wait
for n in "${names[@]}"; do echo "== $n"; grep -v Warn /tmp/runs/$n-validate.log | tail -${#names[@]}; done
