#!/usr/bin/env python
"""Count the operator calls of one segment: bare base vs memory read vs read + write.

Where the GPU is launch-bound (small batches), the memory's cost is roughly its share of extra
operator launches; this measures that share on any machine (torch profiler, CPU ops).

    python benchmarks/count_ops.py [--model M] [--adapter DIR] [--tokens 64] [--out results/ops-cpu.json]
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections import Counter

import torch
from torch.profiler import ProfilerActivity, profile

import gma6
from gma6.base import default_adapter
from gma6.io import atomic_write_text


def top_level_ops(fn) -> Counter:
    """aten operators called from Python (not from inside another aten operator)."""
    with torch.no_grad():
        fn()  # warm
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
    return Counter(e.name for e in prof.events()
                   if e.name.startswith("aten::") and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--adapter", default=str(default_adapter()))
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--out", default="results/ops-cpu.json")
    args = ap.parse_args()
    base, tok = gma6.load_base(args.model, progress=False)
    mm = gma6.load_adapter(base, args.adapter)
    ids = torch.randint(3, 1000, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    state = mm.init_state(1)
    with mm.memory_disabled():
        bare = top_level_ops(lambda: mm.base(input_ids=ids, logits_to_keep=1))
    read = top_level_ops(lambda: mm(input_ids=ids, memory_state=state, logits_to_keep=1, write=False))
    both = top_level_ops(lambda: mm(input_ids=ids, memory_state=state, logits_to_keep=1))
    n = {k: sum(c.values()) for k, c in (("base", bare), ("memory_read", read), ("memory_read_write", both))}
    extra = both - bare
    result = {"command": "python " + shlex.join(sys.argv), "date": time.strftime("%Y-%m-%d"),
              "adapter": args.adapter, "memory_layers": mm.config.layers, "tokens": args.tokens, "ops": n,
              "extra_over_base": {"read": round(n["memory_read"] / n["base"] - 1, 4),
                                  "read_write": round(n["memory_read_write"] / n["base"] - 1, 4)},
              "most_common_extra": extra.most_common(15)}
    atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("ops", "extra_over_base")}))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
