#!/usr/bin/env bash
# One of the staging runs on the lent GPU (../shared/GPU.md): copy the carried pieces to /tmp/g.
# Pieces: the GGUF's four .part0k chunks, or, when the tree is too big for a 61 MiB chunk to travel
# with it, 45 MiB pieces made with: cat .device/gemma/*.part0? | split -b 45M -d -a 1 - .device/g2/p
# Wheels too large to travel beside the tree (bitsandbytes) go in .device/bnb/, carried alone.
# Each call carries only some of these: copy whichever came (no set -e: the other globs match nothing).
mkdir -p /tmp/g
for f in .device/gemma/*.part0* .device/g*/p? .device/bnb/*.whl; do [ -f "$f" ] && cp "$f" /tmp/g/; done
ls -la /tmp/g
