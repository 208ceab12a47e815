#!/usr/bin/env python
"""Time of the memory-only training step under the base's checkpointing with the slots prepared for all layers at
once before the forward (``StackedSlots``, recomputed in backward and made again there: the library's way since
session 20) against each layer preparing its own inside the recomputed layers (session 19's way), alternating steps.

    python benchmarks/train_prepare_ab.py [--model M | --shape benchmarks/gemma3-270m-config.json] [--adapter DIR]
        [--batch 8] [--context 4096] [--segment 512] [--positions 32] [--steps 4] [--out F]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from train_steps import TrainSteps, add_arguments

from gma6.io import atomic_write_text
from gma6.model import MemoryModel


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(ap, batch=8, context=4096, positions=32, device="cuda")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    args.checkpointing = True
    steps = TrainSteps(args)
    mm, dev = steps.mm, steps.device
    params = list(mm.memory_parameters())
    prepare = MemoryModel._prepare_site
    mode = {"stacked": False}

    def prepare_site(self, call, batch):  # "per_layer": nothing prepared here, as session 19 did under checkpointing
        return prepare(self, call, batch) if mode["stacked"] else None

    MemoryModel._prepare_site = prepare_site

    def step() -> float:
        torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        steps.memory_loss().backward()
        torch.cuda.synchronize(dev)
        for p in params:
            p.grad = None
        return time.perf_counter() - t0

    times: dict[str, list[float]] = {"per_layer": [], "stacked": []}
    peaks: dict[str, float] = {}
    for i in range(args.steps + 1):
        for name in (("per_layer", "stacked") if i % 2 == 0 else ("stacked", "per_layer")):
            mode["stacked"] = name == "stacked"
            torch.cuda.reset_peak_memory_stats(dev)
            t = step()
            peaks[name] = max(peaks.get(name, 0.0), torch.cuda.max_memory_allocated(dev) / 2**30)
            if i:  # the first round warms up
                times[name].append(t)
    MemoryModel._prepare_site = prepare
    result = steps.header()
    result.update({k: {"median_s": round(statistics.median(v), 4), "steps_s": [round(x, 4) for x in v],
                       "peak_gib": round(peaks[k], 3)} for k, v in times.items()})
    print(json.dumps({k: result[k] for k in times}))
    if args.out:
        atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
