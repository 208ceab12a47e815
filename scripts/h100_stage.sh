#!/usr/bin/env bash
# One of the staging runs on the lent GPU (../shared/GPU.md): copy the carried pieces to /tmp/g.
# Pieces: the GGUF's four .part0k chunks, or, when the tree is too big for a 61 MiB chunk to travel
# with it, 50 MiB pieces made with: cat .device/gemma/*.part0? | split -b 50M -d -a 1 - .device/g2/p
# Wheels too large to travel beside the tree (bitsandbytes) go in .device/bnb/, carried alone.
set -e
mkdir -p /tmp/g && cp .device/gemma/*.part0* .device/g2/p* .device/bnb/*.whl /tmp/g/ 2>/dev/null; ls -la /tmp/g
