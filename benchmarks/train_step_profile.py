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
import time

import torch
from torch.profiler import ProfilerActivity, profile
from train_steps import TrainSteps, add_arguments

from gma6.io import atomic_write_text


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
    # operator calls, nested ones included (aten::linear and the addmm under it): what a launch-bound GPU pays for
    calls = sum(e.count for e in events if e.key.startswith("aten::"))
    return {"seconds": round(seconds, 4), "profiled_self_ms": round(total / 1e3, 1), "aten_calls": calls, "top": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(ap, batch=8, context=4096, positions=32, device="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--out", default="results/train-profile.json")
    args = ap.parse_args()
    steps = TrainSteps(args)
    opt = torch.optim.AdamW(steps.mm.memory_parameters(), lr=1e-6)

    def memory_step() -> None:
        steps.memory_loss().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    memory = profiled(memory_step, steps.device, args.top)
    with steps.frozen_floor() as frozen_loss:
        floor = profiled(lambda: frozen_loss().backward(), steps.device, args.top)
    result = {
        **steps.header(), "train_memory": memory, "train_frozen": floor,
        "memory_over_frozen_seconds": round(memory["seconds"] / floor["seconds"], 3),
    }
    print(json.dumps({k: result[k] for k in ("memory_over_frozen_seconds",)}))
    for name in ("train_memory", "train_frozen"):
        print(f"== {name}: {result[name]['seconds']} s, {result[name]['aten_calls']} aten calls")
        for r in result[name]["top"][:14]:
            print(f"  {r['self_ms']:9.1f} ms {r['calls']:6d}  {r['op'][:90]}")
    atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
