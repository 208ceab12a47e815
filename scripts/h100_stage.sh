#!/usr/bin/env bash
# One of the staging runs on the lent GPU (../shared/GPU.md): copy the carried GGUF chunk to /tmp/g.
# Chunks: the four .part0k files, or, when the tree is too big for a 61 MiB chunk to travel with it,
# 50 MiB pieces made with: cat .device/gemma/*.part0? | split -b 50M -d -a 1 - .device/g2/p
set -e
mkdir -p /tmp/g && cp .device/gemma/*.part0* .device/g2/p* /tmp/g/ 2>/dev/null; ls -la /tmp/g
