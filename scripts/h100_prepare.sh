#!/usr/bin/env bash
# After the staging runs: assemble the GGUF, install the carried wheels (.device/wheels and any
# staged .whl) to /tmp/pylib, convert the GGUF once into GMA6_CACHE (~70 s). Carries .device/wheels.
set -uo pipefail
source scripts/h100_env.sh
cd /tmp/g && if [ ! -f gemma.gguf ]; then if [ -f p0 ]; then cat p? > gemma.gguf; else cat *.part0? > gemma.gguf; fi; fi
sha256sum gemma.gguf; cd - >/dev/null
python3 -m pip install -q --no-deps --target /tmp/pylib .device/wheels/*.whl $(ls /tmp/g/*.whl 2>/dev/null) 2>&1 | grep -v WARN | tail -2
python3 -c "
import time, torch, gma6; t = time.time()
base, tok = gma6.load_base('$M', dtype=torch.bfloat16, device='cuda', progress=False)
ids = tok('The capital of France is', return_tensors='pt').input_ids.cuda()
print('bos', ids[0, 0].item() == tok.bos_token_id, tok.decode(base.generate(ids, max_new_tokens=6, do_sample=False)[0]), f'{time.time() - t:.0f}s')
import bitsandbytes; print('bitsandbytes', bitsandbytes.__version__)
"
