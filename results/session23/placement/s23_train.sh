#!/bin/bash
# session 23, call 6: l1's kind trained from scratch with its lineage's first recipe (a2's command: curriculum 1,2,4 x 120
# steps, batch 32, lr 1e-3), memory at layers 0-16 (as l1) and at 12-16, side by side on one GPU; checkpoints to /tmp/runs
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
bash .device/s21_stage.sh > /dev/null
bash scripts/h100_prepare.sh 2>&1 | grep -v bitsandbytes | tail -3
source scripts/h100_env.sh
TL=${TL:-400}
for spec in p0=0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16 p12=12,13,14,15,16; do
  n=${spec%%=*}; L=${spec#*=}
  timeout $((TL + 90)) python3 -m gma6.cli train --out /tmp/runs/$n --model $M --segment-length 256 --curriculum 1,2,4 \
    --steps-per-stage 120 --batch-size 32 --lr 1e-3 --memory gated --slots 128 --memory-dim 0 --layers $L --workers 3 \
    --seed 0 --read-rule base --write-rule tokens --tokens-per-segment 64 --token-retention priority --usage-decay 0.99 \
    --select-weight 1 --kl-weight 1 --lm-positions 8 --questions-per-context 4 --read-site attention --lora-rank 0 \
    --read-rank 8 --checkpoint-every 20 --log-every 10 --time-limit $TL > /tmp/runs/$n.log 2>&1 &
done
wait
mkdir -p $OUT/t
for n in p0 p12; do tail -2 /tmp/runs/$n.log; tail -1 /tmp/runs/$n/log.jsonl; cp /tmp/runs/$n/log.jsonl $OUT/t/$n-log.jsonl; cp /tmp/runs/$n.log $OUT/t/$n.txt; done
cd /tmp/runs && tar czf $OUT/t/ckpt.tgz p0/checkpoint p12/checkpoint $(ls -d p0/adapter p12/adapter 2>/dev/null)
ls -la $OUT/t
