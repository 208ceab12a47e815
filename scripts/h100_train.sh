#!/usr/bin/env bash
# Train a memory adapter on the lent H100 and validate it, after the four staging runs
# (scripts/h100_stage.sh carrying one GGUF chunk each). Carries .device/wheels.
# Usage (device tool): bash scripts/h100_train.sh NAME [extra gma6 train options]
set -uo pipefail
name=${1:-run}; shift || true
export PYTHONUNBUFFERED=1 GMA6_CACHE=/tmp/gcache TOKENIZERS_PARALLELISM=false
cd /tmp/g && if [ ! -f gemma.gguf ]; then if [ -f p0 ]; then cat p? > gemma.gguf; else cat *.part00 *.part01 *.part02 *.part03 > gemma.gguf; fi; fi; sha256sum gemma.gguf; cd - >/dev/null
python3 -m pip install -q --no-deps --target /tmp/pylib .device/wheels/*.whl 2>&1 | grep -v WARN | tail -2
export PYTHONPATH=/tmp/pylib:src
run=/tmp/runs/$name
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout ${TRAIN_SECONDS:-420} python3 -m gma6.cli train --model /tmp/g/gemma.gguf --out $run "$@" 2>&1 \
  | tr '\r' '\n' | grep -v -E '^(training|Loading)' | tee $OUT/train-$name.log
adapter=$run/adapter; [ -f $adapter/memory_adapter.safetensors ] || adapter=$run/checkpoint
mkdir -p $OUT/$name && cp $adapter/gma6_config.json $adapter/memory_adapter.safetensors $OUT/$name/
[ -f $run/adapter/training.json ] && cp $run/adapter/training.json $OUT/$name/
cp $run/log.jsonl $run/loss.png $OUT/$name/ 2>/dev/null
python3 - "$adapter" "${VAL_LENGTHS:-1024,2048,4096,8192,16384}" "${VAL_N:-32}" "${VAL_SEG:-256}" <<'PY' 2>&1 | tee $OUT/val-$name.log
import json, sys, time, torch, gma6
from gma6.training import validate
adapter, lengths, n, seg = sys.argv[1], [int(x) for x in sys.argv[2].split(",")], int(sys.argv[3]), int(sys.argv[4])
base, tok = gma6.load_base("/tmp/g/gemma.gguf", dtype=torch.bfloat16, device="cuda")
mm = gma6.load_adapter(base, adapter)
tasks = ["qa1", "qa2", "qa3", "qa4", "qa5"]
rows = []
for L in lengths:
    t = time.time(); mem = validate(mm, tok, tasks, L, n, seg)
    with mm.memory_disabled():
        bare = validate(mm, tok, tasks, L, n, seg)
    for task in tasks:
        rows.append({"length": L, "task": task, "memory": mem[task], "base_question_only": bare[task], "n": n})
    print(L, "memory", {k: round(v, 3) for k, v in mem.items()}, "bare", {k: round(v, 3) for k, v in bare.items()}, f"{time.time()-t:.0f}s", flush=True)
print(json.dumps({"adapter": adapter, "segment_length": seg, "device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "rows": rows}))
PY
