#!/usr/bin/env python
"""Where a training step's peak GPU memory goes: the memory-only step and the frozen floor (``train_steps.py``),
each recorded with CUDA's allocator history; the blocks live at the step's peak, grouped by the innermost Python
line outside torch that allocated them (backward's own buffers have none: grouped by size).

    python benchmarks/train_peak.py [--model M | --shape benchmarks/gemma3-270m-config.json] [--adapter DIR]
        [--batch 8] [--context 4096] [--segment 512] [--positions 32] [--checkpointing] [--top 15] [--out F]

Blocks allocated before the step (weights, the optimizer's state) are not in the history: ``peak_gib`` is
``torch.cuda.max_memory_allocated`` (everything), ``step_peak_gib`` what the step itself held at its peak.
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.utils.checkpoint
from train_steps import TrainSteps, add_arguments

from gma6.io import atomic_write_text


def _where(frames: list[dict]) -> str:
    for f in frames:
        name = f.get("filename", "")
        if "/torch/" not in name and not name.startswith("<") and "train_peak.py" not in name:
            return f"{name.rsplit('/', 2)[-2]}/{name.rsplit('/', 1)[-1]}:{f.get('line')} {f.get('name')}"
    return ""


def peak_breakdown(step, device: torch.device, top: int) -> dict:
    """Run ``step()`` (forward and backward) under the allocator's history; the live blocks at its peak."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")
    try:
        # A checkpoint's early stop (an exception raised inside an op once its tensors are recomputed) and the
        # history's Python stacks gathered on every allocation do not mix: "SystemError: ... returned NULL
        # without setting an exception" (torch 2.11). Recomputed to the end instead: the same tensors.
        with torch.utils.checkpoint.set_checkpoint_early_stop(False):
            step()
        torch.cuda.synchronize(device)
        snap = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    live: dict[int, tuple[int, str]] = {}
    held = best = 0
    at_peak: dict[int, tuple[int, str]] = {}
    for ev in snap["device_traces"][device.index or 0]:
        if ev["action"] == "alloc":
            where = _where(ev.get("frames", [])) or f"(no python frame: backward) {ev['size'] / 2**20:.1f} MiB"
            live[ev["addr"]] = (ev["size"], where)
            held += ev["size"]
            if held > best:
                best, at_peak = held, dict(live)
        elif ev["action"] == "free_completed" and ev["addr"] in live:
            held -= live.pop(ev["addr"])[0]
    groups: dict[str, list] = {}
    for size, where in at_peak.values():
        g = groups.setdefault(where, [0, 0])
        g[0] += size
        g[1] += 1
    ranked = sorted(groups.items(), key=lambda kv: -kv[1][0])[:top]
    return {"peak_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 3), "step_peak_gib": round(best / 2**30, 3),
            "at_peak": [{"where": k, "mib": round(v[0] / 2**20, 1), "blocks": v[1]} for k, v in ranked]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(ap, batch=8, context=4096, positions=32, device="cuda")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not args.device.startswith("cuda") or not torch.cuda.is_available():
        raise SystemExit("train_peak.py reads CUDA's allocator history: it needs a CUDA device")
    steps = TrainSteps(args)
    result = steps.header()
    params = list(steps.mm.memory_parameters())

    def memory_step() -> None:
        steps.memory_loss().backward()
        for p in params:
            p.grad = None

    memory_step()  # warm-up: lazy initialisations, the allocator's first segments
    result["train_memory"] = peak_breakdown(memory_step, steps.device, args.top)
    print(json.dumps(result["train_memory"], indent=1))
    with steps.frozen_floor() as floor_loss:
        floor_loss().backward()
        result["train_frozen"] = peak_breakdown(lambda: floor_loss().backward(), steps.device, args.top)
    print(json.dumps(result["train_frozen"], indent=1))
    if args.out:
        atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
