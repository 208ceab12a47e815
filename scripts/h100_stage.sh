#!/usr/bin/env bash
# One of the staging runs on the lent GPU (../shared/GPU.md): copy the carried pieces to /tmp/g.
# Pieces: the GGUF's four .part0k chunks, or, when the tree is too big for a 61 MiB chunk to travel
# with it (a call carries at most 64 MiB with the tree; the tree is ~31 MB since session 4), 32 MiB
# pieces made with: cat .device/gemma/*.part0? | split -b 32M -d -a 1 - .device/g4/p  (p0 ... p7).
# Carry one directory's pieces only: the prepare step concatenates every p? it finds in /tmp/g.
# Since session 7 the tree (~37 MB) leaves no room for a 32 MiB piece: halves of 16 MiB in .device/g5
# (split -b 16M -d -a 1 .device/g4/pN .device/g5/pN_) are appended in order to /tmp/g/pN.
# Wheels too large to travel beside the tree (bitsandbytes) go in .device/bnb/, carried alone.
# Each call carries only some of these: copy whichever came (no set -e: the other globs match nothing).
mkdir -p /tmp/g
for f in .device/gemma/*.part0* .device/g*/p? .device/bnb/*.whl; do [ -f "$f" ] && cp "$f" /tmp/g/; done
for f in .device/g5/p?_?; do [ -f "$f" ] && b=$(basename "$f") && cat "$f" >> /tmp/g/${b%_*}; done
ls -la /tmp/g
