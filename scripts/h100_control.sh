#!/usr/bin/env bash
# The recall control on the lent GPU: each shipped gated adapter answers every question after reading
# another sample's context (gma6 eval --systems memory_other_context), on the same test samples as
# the side-by-side table, lengths split over parallel processes. Results: $OUT/control.tar.
set -uo pipefail
source scripts/h100_env.sh
A=src/gma6/adapters
for a in gemma3-270m-babilong gemma3-270m-babilong-memory-only; do
  i=0
  for spec in "0k,1k,2k,4k:100,100,100,100" "8k:100" "16k:50" "32k:25"; do
    i=$((i+1))
    timeout ${EVAL_SECONDS:-300} python3 -m gma6.cli eval --model $M --lengths ${spec%%:*} --samples ${spec#*:} \
      --segment-length 256 --out-dir /tmp/ctl --no-progress --systems memory_other_context --batch-size 32 \
      --adapter $A/$a --name $a-part$i > /tmp/ctl-$a-$i.log 2>&1 &
  done
done
wait
tar cf $OUT/control.tar -C /tmp/ctl $(cd /tmp/ctl && ls *.json)
grep -h -E "mean|Error" /tmp/ctl-*.log
