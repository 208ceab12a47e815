#!/usr/bin/env python
"""Host and wall time of the parts of one segment: the bare base, the memory's read (a ``write=False`` forward), read
and write (``read()``'s step), and, alone, the write of collected hidden states and the slots' preparation for the
read (both once a segment). On a GPU the host time (until the call returns, the GPU idle before it) against the wall
time (until the GPU is done) tells launch-bound parts from kernel-bound ones; on a CPU the two are one.

    python benchmarks/segment_parts.py [--model M] [--adapter DIR] [--device cuda] [--dtype bfloat16]
                                       [--batch 8] [--tokens 1024] [--repeats 20] [--out F]

Writes {"command", "date", "device", "dtype", "adapter", "batch", "tokens", "parts": {name: {"host_ms", "wall_ms"}}}:
medians over the repeats, the parts alternating.
"""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time

import torch

import gma6
from gma6.base import default_adapter
from gma6.io import atomic_write_text


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--adapter", default=str(default_adapter()))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.batch < 1 or args.tokens < 2 or args.repeats < 1:
        raise SystemExit("--batch and --repeats must be positive, --tokens at least 2")
    device = torch.device(args.device)
    base, _ = gma6.load_base(args.model, dtype=getattr(torch, args.dtype), device=args.device, progress=False)
    mm = gma6.load_adapter(base, args.adapter)
    g = torch.Generator().manual_seed(0)
    high = min(1000, base.get_input_embeddings().num_embeddings)
    segments = [torch.randint(3, high, (args.batch, args.tokens), generator=g).to(device) for _ in range(4)]
    mask = torch.ones_like(segments[0], dtype=torch.bool)
    with torch.no_grad():
        state = mm.init_state(args.batch)
        for ids in segments[:3]:  # slots written, as a document's fourth segment sees them
            state = mm(input_ids=ids, memory_state=state, logits_to_keep=1).memory_state
        ids = segments[3]
        # what the write takes (the hooked layers' outputs through their reading norms), caught in one forward
        caught: list[torch.Tensor] = []
        write = mm.controller.write
        mm.controller.write = lambda st, hs, *rest: (caught.extend(h.clone() for h in hs), write(st, hs, *rest))[1]
        try:
            mm(input_ids=ids, memory_state=state, logits_to_keep=1)
        finally:
            del mm.controller.write  # the class's method again
        hiddens = caught[: len(mm.config.layers)]

        def slots_prepared() -> None:  # as MemoryModel._segment prepares what every layer's read takes
            mm._prepare_site(mm._make_call(state, write=True), args.batch)

        def bare() -> None:
            with mm.memory_disabled():
                mm.base(input_ids=ids, logits_to_keep=1, use_cache=False)

        parts = {
            "base": bare,
            "memory_read": lambda: mm(input_ids=ids, memory_state=state, logits_to_keep=1, write=False),
            "memory_read_write": lambda: mm(input_ids=ids, memory_state=state, logits_to_keep=1),
            "write_alone": lambda: mm.controller.write(state, hiddens, mask, False, True),
            "slots_prepared_alone": slots_prepared,
        }
        host: dict[str, list[float]] = {k: [] for k in parts}
        wall: dict[str, list[float]] = {k: [] for k in parts}
        for fn in parts.values():  # warm-up
            fn()
        for _ in range(args.repeats):
            for name, fn in parts.items():
                _sync(device)
                t0 = time.perf_counter()
                fn()
                t1 = time.perf_counter()
                _sync(device)
                t2 = time.perf_counter()
                host[name].append(t1 - t0)
                wall[name].append(t2 - t0)
    result = {
        "command": "python " + shlex.join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "date": time.strftime("%Y-%m-%d"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": args.dtype, "torch": torch.__version__, "adapter": args.adapter, "batch": args.batch,
        "tokens": args.tokens, "repeats": args.repeats,
        "parts": {k: {"host_ms": round(1e3 * statistics.median(host[k]), 3), "wall_ms": round(1e3 * statistics.median(wall[k]), 3)}
                  for k in parts},
    }
    print(json.dumps(result["parts"]))
    if args.out:
        atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
