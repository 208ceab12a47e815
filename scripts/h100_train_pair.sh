#!/usr/bin/env bash
# Call A: the gated memory and the RMT peer trained side by side on the same data, curriculum,
# steps and seeds (issue 7), while the bare base and the shipped adapter are evaluated (gma6 eval).
# Usage: STEPS=170 TRAIN_SECONDS=400 [LOSS="--kl-weight 1 --lm-positions 32"] [EVAL_BASE=0]
#        bash scripts/h100_train_pair.sh GATED_NAME RMT_NAME
# Re-running with the same names resumes from /tmp/runs/NAME/checkpoint (same warm machine).
set -uo pipefail
source scripts/h100_env.sh
g=${1:-g4}; r=${2:-r1}; S=${STEPS:-170}; T=${TRAIN_SECONDS:-400}
LOSS=${LOSS:---lm-weight 1 --lm-positions 32}
common="--model $M --segment-length 256 --curriculum ${CURRICULUM:-1,2,4} --steps-per-stage $S --batch-size 32 --lr 1e-3
 $LOSS --time-limit $T --checkpoint-every 50 --log-every 10 --workers 4 --seed 0"
ev="--model $M --lengths 0k,1k,2k,4k,8k,16k,32k --samples 100,100,100,100,100,50,25 --segment-length 256
 --out-dir /tmp/ev --no-progress"
python3 -m gma6.cli train --out /tmp/runs/$g --memory gated --slots 16 --memory-dim 128 --layers 3,8,12,17 $common > /tmp/runs/$g.log 2>&1 &
python3 -m gma6.cli train --out /tmp/runs/$r --memory rmt --slots 16 $common > /tmp/runs/$r.log 2>&1 &
if [ "${EVAL_BASE:-1}" = 1 ]; then
timeout $((T + 60)) python3 -m gma6.cli eval $ev --systems base_full,base_last_segment --batch-size 16 --name base > /tmp/ev/base.log 2>&1 &
timeout $((T + 60)) python3 -m gma6.cli eval $ev --systems memory --adapter src/gma6/adapters/gemma3-270m-babilong --batch-size 32 --name shipped > /tmp/ev/shipped.log 2>&1 &
fi
wait
for x in $g $r; do
  tar cf $OUT/$x.tar -C /tmp/runs $x.log $x/log.jsonl $x/loss.png $(cd /tmp/runs && ls -d $x/adapter 2>/dev/null) $x/checkpoint/gma6_config.json $x/checkpoint/memory_adapter.safetensors
  tr '\r' '\n' < /tmp/runs/$x.log | grep -E "done|stopped|trainable|Error" | tail -4
  tail -2 /tmp/runs/$x/log.jsonl
done
cp /tmp/ev/base.json /tmp/ev/shipped.json $OUT/ 2>/dev/null; tail -c 3000 /tmp/ev/base.log 2>/dev/null; tail -c 1500 /tmp/ev/shipped.log 2>/dev/null
