#!/usr/bin/env python
"""Run ``gma6 bench`` (same options); see ``gma6 bench --help``.

The CPU numbers in results/bench-cpu.json came from (2-core shared sandbox, one torch thread):

    OMP_NUM_THREADS=1 python benchmarks/run_bench.py --threads 1 -c 1k -c 2k -c 4k -c 8k -c 16k \
        -b 1 -s 512 -s 1024 --max-seconds 130 --train-context 1k --train-warmup 0 \
        --paired 16 --out results/bench-cpu.json

(batch 8 left out on that shared CPU for time; ``--max-seconds`` skips a pass predicted, from the
previous context, to take longer: linearly for the segmented systems, quadratically for base_full.)
"""

from __future__ import annotations

import sys

from gma6.cli import app

if __name__ == "__main__":
    app(args=["bench", *sys.argv[1:]], prog_name="benchmarks/run_bench.py")
