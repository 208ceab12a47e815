#!/bin/bash
# session 23, call 7: finish both runs (exact resume from /tmp/runs/*/checkpoint), then gma6 eval at 4k (l1's eval: 100
# test samples a task, seed 6) for both, side by side
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
source scripts/h100_env.sh
TL=${TL:-250}
for spec in p0=0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16 p12=12,13,14,15,16; do
  n=${spec%%=*}; L=${spec#*=}
  if [ ! -d /tmp/runs/$n/adapter ]; then
  timeout $((TL + 90)) python3 -m gma6.cli train --out /tmp/runs/$n --model $M --segment-length 256 --curriculum 1,2,4 \
    --steps-per-stage 120 --batch-size 32 --lr 1e-3 --memory gated --slots 128 --memory-dim 0 --layers $L --workers 3 \
    --seed 0 --read-rule base --write-rule tokens --tokens-per-segment 64 --token-retention priority --usage-decay 0.99 \
    --select-weight 1 --kl-weight 1 --lm-positions 8 --questions-per-context 4 --read-site attention --lora-rank 0 \
    --read-rank 8 --checkpoint-every 20 --log-every 10 --time-limit $TL >> /tmp/runs/$n.log 2>&1 &
  fi
done
wait
mkdir -p $OUT/t
for n in p0 p12; do
  a=/tmp/runs/$n/adapter; [ -d $a ] || a=/tmp/runs/$n/checkpoint
  timeout 300 python3 -m gma6.cli eval --model $M --segment-length 256 --out-dir /tmp/ev --no-progress --no-plot --systems memory \
    --batch-size 32 --adapter $a --lengths 4k --samples 100 --seed 6 --name $n-s6 > /tmp/ev/$n.log 2>&1 &
done
wait
for n in p0 p12; do echo "== $n"; tail -1 /tmp/runs/$n/log.jsonl; tail -c 400 /tmp/ev/$n.log; cp /tmp/ev/$n-s6.json $OUT/t/ 2>/dev/null; cp /tmp/runs/$n/log.jsonl $OUT/t/$n-log.jsonl; cp /tmp/runs/$n.log $OUT/t/$n.txt; done
cd /tmp/runs && tar czf $OUT/t/adapters.tgz $(ls -d p0/adapter p12/adapter 2>/dev/null) $(ls p0/adapter >/dev/null 2>&1 || echo p0/checkpoint) $(ls p12/adapter >/dev/null 2>&1 || echo p12/checkpoint)
ls -la $OUT/t
