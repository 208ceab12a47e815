#!/usr/bin/env bash
# Several gated-memory trainings side by side on one GPU, same data, curriculum, steps and seed,
# each with its own options; then (EVAL_SECONDS > 0) gma6 eval of every run, in parallel processes.
# Usage: STEPS=300 TRAIN_SECONDS=520 [EVAL_SECONDS=0] [CURRICULUM=1,2,4]
#        bash scripts/h100_train_runs.sh "g5=--kl-weight 1 --lm-positions 32" "g6=--lora-rank 8 ..."
# Re-running with the same names resumes from /tmp/runs/NAME/checkpoint (same warm machine).
set -uo pipefail
source scripts/h100_env.sh
S=${STEPS:-300}; T=${TRAIN_SECONDS:-520}; E=${EVAL_SECONDS:-0}
common="--model $M --segment-length 256 --curriculum ${CURRICULUM:-1,2,4} --steps-per-stage $S --batch-size 32 --lr 1e-3
 --memory gated --slots 16 --memory-dim 128 --layers 3,8,12,17
 --time-limit $T --checkpoint-every 50 --log-every 10 --workers 3 --seed 0"
names=()
for spec in "$@"; do
  n=${spec%%=*}; opts=${spec#*=}; names+=("$n")
  python3 -m gma6.cli train --out /tmp/runs/$n $common $opts >> /tmp/runs/$n.log 2>&1 &
done
wait
for n in "${names[@]}"; do
  tar cf $OUT/$n.tar -C /tmp/runs $n.log $n/log.jsonl $n/loss.png $(cd /tmp/runs && ls -d $n/adapter 2>/dev/null) \
    $n/checkpoint/gma6_config.json $n/checkpoint/memory_adapter.safetensors $(cd /tmp/runs && ls $n/checkpoint/lora_adapter.safetensors 2>/dev/null)
  echo "== $n"; tr '\r' '\n' < /tmp/runs/$n.log | grep -E "done|stopped|trainable|Error" | tail -3; tail -1 /tmp/runs/$n/log.jsonl
done
if [ "$E" -gt 0 ]; then
  EVAL_SECONDS=$E EVAL_LENGTHS=${EVAL_LENGTHS:-0k,1k,4k,16k,32k} EVAL_SAMPLES=${EVAL_SAMPLES:-100,100,100,50,25} \
    bash scripts/h100_eval_pair.sh "${names[@]}"
fi
