#!/usr/bin/env bash
# Data-parallel training on a lent machine of several GPUs (after scripts/h100_stage.sh + h100_prepare.sh): the same
# run from b1 as one process and as N under torchrun, the same global batch and stories, answer loss only (the
# context terms draw random positions per replica's rows, so only the answer loss is the same step exactly); then
# scripts/compare_adapters.py and each run's tokens/s. Leaves $OUT/ddp-compare.json and both logs.
# Usage: [N=2] [STEPS=20] [INIT=.device/init/b1] bash scripts/gpu_ddp_check.sh
set -uo pipefail
source scripts/h100_env.sh
N=${N:-2}; S=${STEPS:-20}; I=${INIT:-.device/init/b1}
common="--model $M --init-adapter $I --lora-rank 0 --segment-length 256 --curriculum 4 --steps-per-stage $S
 --batch-size 32 --lr 1e-4 --warmup-steps 2 --seed 7 --tasks qa1,qa2,qa2,qa3,qa3,qa4,qa4,qa5 --log-every 5
 --checkpoint-every 0 --workers 3 --no-resume"
rm -rf /tmp/runs/ddp /tmp/runs/one
python3 -m torch.distributed.run --standalone --nproc-per-node $N -m gma6.cli train --out /tmp/runs/ddp $common > /tmp/runs/ddp.log 2>&1
CUDA_VISIBLE_DEVICES=0 python3 -m gma6.cli train --out /tmp/runs/one $common > /tmp/runs/one.log 2>&1
python3 scripts/compare_adapters.py --a /tmp/runs/one/adapter --b /tmp/runs/ddp/adapter --atol 1e-2 \
  --out $OUT/ddp-compare.json
cp /tmp/runs/ddp/log.jsonl $OUT/ddp-log.jsonl; cp /tmp/runs/one/log.jsonl $OUT/one-log.jsonl
for r in one ddp; do echo "== $r"; tail -1 /tmp/runs/$r/log.jsonl; grep -E "Error|done" /tmp/runs/$r.log | tail -2; done
