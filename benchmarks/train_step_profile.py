#!/usr/bin/env python
"""Where a memory-only training step spends its time, against the frozen floor (``gma6 bench``'s
``train_frozen``: the bare base's forward and backward with a free adapter at its embeddings).

One untimed step each, then one step under ``torch.profiler``: the operators with the most self device time
(CUDA) or self CPU time (CPU), and the step's wall time. Same tokens and loss as ``gma6 bench``'s training rows
(next-token loss at ``positions`` evenly spread positions a segment).

    python benchmarks/train_step_profile.py [--model M] [--adapter DIR] [--device cuda] [--dtype bfloat16]
        [--batch 8] [--context 4096] [--segment 512] [--positions 32] [--top 20] [--out results/train-profile.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import gma6
from gma6.base import default_adapter
from gma6.io import atomic_write_text
from gma6.model import split_segments


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def profiled(step, device: torch.device, top: int) -> dict:
    """One warm-up step, then one timed and one profiled step: wall seconds and the top operators."""
    step()
    _sync(device)
    t = time.perf_counter()
    step()
    _sync(device)
    seconds = time.perf_counter() - t
    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        step()
        _sync(device)
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: -getattr(e, key, 0))
    total = sum(getattr(e, key, 0) for e in events)
    rows = [{"op": e.key, "calls": e.count, "self_ms": round(getattr(e, key, 0) / 1e3, 2)} for e in events[:top]]
    return {"seconds": round(seconds, 4), "profiled_self_ms": round(total / 1e3, 1), "top": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--adapter", default=str(default_adapter()))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--segment", type=int, default=512)
    ap.add_argument("--positions", type=int, default=32)
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--out", default="results/train-profile.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    device = torch.device(args.device)
    model, _ = gma6.load_base(args.model, progress=False, dtype=getattr(torch, args.dtype), device=device)
    ids = torch.randint(0, 1000, (args.batch, args.context), device=device)
    segs = split_segments(ids, torch.ones_like(ids, dtype=torch.bool), args.segment)
    pos = torch.linspace(0, args.segment - 2, args.positions, device=device).round().long().unique()

    def loss_at(logits: torch.Tensor, seg_ids: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float().flatten(0, 1), seg_ids[:, pos + 1].flatten())

    mm = gma6.load_adapter(model, args.adapter)
    opt = torch.optim.AdamW(mm.memory_parameters(), lr=1e-6)

    def memory_step() -> None:
        state, loss = mm.init_state(args.batch), 0.0
        for seg_ids, seg_mask in segs:
            out = mm(input_ids=seg_ids, attention_mask=seg_mask, logits_to_keep=pos, memory_state=state)
            state, loss = out.memory_state, loss + loss_at(out.logits, seg_ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    memory = profiled(memory_step, device, args.top)
    base = mm.detach()
    base.requires_grad_(False)  # detach() hands the base back as it came (a fresh load trains every weight)
    probe = torch.nn.Parameter(torch.zeros((), device=device))
    handle = base.get_input_embeddings().register_forward_hook(lambda m, i, out: out + probe.to(out.dtype))

    def frozen_step() -> None:
        loss = 0.0
        for seg_ids, seg_mask in segs:
            loss = loss + loss_at(base(input_ids=seg_ids, attention_mask=seg_mask.long(), logits_to_keep=pos).logits, seg_ids)
        loss.backward()

    try:
        floor = profiled(frozen_step, device, args.top)
    finally:
        handle.remove()
    result = {
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "date": time.strftime("%Y-%m-%d"),
        "machine": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "device": device.type, "dtype": args.dtype, "adapter": args.adapter, "batch": args.batch,
        "context": args.context, "segment": args.segment, "positions": len(pos),
        "train_memory": memory, "train_frozen": floor,
        "memory_over_frozen_seconds": round(memory["seconds"] / floor["seconds"], 3),
    }
    print(json.dumps({k: result[k] for k in ("memory_over_frozen_seconds",)}))
    for name in ("train_memory", "train_frozen"):
        print(f"== {name}: {result[name]['seconds']} s")
        for r in result[name]["top"][:14]:
            print(f"  {r['self_ms']:9.1f} ms {r['calls']:6d}  {r['op'][:90]}")
    atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
