#!/usr/bin/env bash
# One of the staging runs on the lent GPU (../shared/GPU.md): copy the carried GGUF chunk to /tmp/g.
set -e
mkdir -p /tmp/g && cp .device/gemma/*.part0* /tmp/g/ && ls -la /tmp/g
