#!/usr/bin/env python
"""Count the operator calls (and, on CUDA, the kernel launches) of one segment: bare base vs the
memory's read-only pass vs ``read``'s full segment step (read + write).

Where the GPU is launch-bound (small batches, a small model), the memory's cost is roughly its
share of extra operator calls and kernel launches; this measures that share on any machine.

    python benchmarks/count_ops.py [--model M] [--adapter DIR [--kind-only]] [--tokens 64] [--device cpu] [--dtype float32]
                                   [--out results/ops-cpu.json]
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

# aten operators that only make a new view of the same storage: no kernel, a little dispatch time
VIEW_OPS = {"aten::view", "aten::transpose", "aten::unsqueeze", "aten::t", "aten::_unsafe_view", "aten::expand",
            "aten::select", "aten::split", "aten::permute", "aten::detach", "aten::slice", "aten::alias",
            "aten::squeeze", "aten::unbind", "aten::as_strided", "aten::chunk", "aten::reshape", "aten::unflatten",
            "aten::flatten", "aten::narrow", "aten::view_as", "aten::expand_as", "aten::contiguous", "aten::lift_fresh"}


def profile_segment(fn, cuda: bool) -> dict[str, Counter]:
    """aten operators called from Python (not from inside another aten operator) and, on CUDA, kernels."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch.no_grad():
        fn()  # warm
        if cuda:
            torch.cuda.synchronize()
        with profile(activities=activities) as prof:
            fn()
            if cuda:
                torch.cuda.synchronize()
    events = prof.events()
    ops = Counter(e.name for e in events if e.name.startswith("aten::")
                  and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")))
    gpu = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA
           and not e.name.startswith("Memcpy") and not e.name.startswith("Memset")]
    kernels = Counter(e.name for e in gpu)
    return {"ops": ops, "kernels": kernels, "kernel_us": sum(e.device_time for e in gpu)}


def host_syncs(fn) -> tuple[int, Counter]:
    """How many times ``fn`` makes the host wait for the GPU (each costs the CPU/GPU overlap), and
    where: the innermost frames outside torch of each sync, counted."""
    import traceback
    import warnings

    where: Counter = Counter()

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        if "synchroniz" not in str(message):
            return
        frames = [f for f in traceback.extract_stack()[:-1] if "/torch/" not in f.filename and "warnings" not in f.filename]
        where[" < ".join(f"{f.filename.rsplit('/', 2)[-1]}:{f.lineno}" for f in frames[-3:][::-1])] += 1

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum(where.values()), where


def wall_ms(fn, cuda: bool, n: int = 20) -> float:
    """Mean wall time of ``fn`` (after a warm call): with ``kernel_us`` it tells launch-bound
    (wall well above the kernels' own time) from compute-bound."""
    with torch.no_grad():
        fn()
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        if cuda:
            torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--adapter", default=str(default_adapter()),
                    help="adapter folder, or 'fresh' for a new memory of the default config (what gma6 bench reads with)")
    ap.add_argument("--kind-only", action="store_true",
                    help="a fresh memory of the adapter's config, its LoRA left out (what gma6 bench --adapter times)")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--out", default="results/ops-cpu.json")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    base, tok = gma6.load_base(args.model, dtype=dtype, device=args.device, progress=False)
    if args.adapter == "fresh":
        mm = gma6.attach_memory(base)
    elif args.kind_only:
        import dataclasses

        mm = gma6.attach_memory(base, dataclasses.replace(gma6.GMA6Config.load(args.adapter), lora_rank=0))
    else:
        mm = gma6.load_adapter(base, args.adapter)
    ids = torch.randint(3, 1000, (args.batch, args.tokens), generator=torch.Generator().manual_seed(0)).to(args.device)
    mask = torch.ones_like(ids, dtype=torch.bool)
    state = mm.init_state(args.batch)
    cuda = torch.device(args.device).type == "cuda"
    def run_bare() -> None:
        with mm.memory_disabled():  # as gma6 bench runs the bare base over segments
            mm.base(input_ids=ids, logits_to_keep=1, use_cache=False)  # a full segment gets no padding mask, as in read()

    fns = {"base": run_bare,
           "memory_read": lambda: mm(input_ids=ids, memory_state=state, logits_to_keep=1, write=False),
           "memory_read_write": lambda: mm._read_step(ids, mask, state, full=True)}
    systems = {k: profile_segment(f, cuda) for k, f in fns.items()}
    bare, both = systems["base"], systems["memory_read_write"]
    # alternating, so drifting clocks touch every system alike
    walls: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(3):
        for k, f in fns.items():
            walls[k].append(wall_ms(f, cuda))

    def totals(c: Counter) -> dict[str, int]:
        views = sum(n for k, n in c.items() if k in VIEW_OPS)
        return {"all": sum(c.values()), "views": views, "compute": sum(c.values()) - views}

    ops = {k: totals(v["ops"]) for k, v in systems.items()}
    result = {"command": "python " + shlex.join(sys.argv), "date": time.strftime("%Y-%m-%d"),
              "device": torch.cuda.get_device_name() if cuda else "cpu", "dtype": args.dtype,
              "torch": torch.__version__, "adapter": args.adapter, "memory_layers": mm.config.layers,
              "tokens": args.tokens, "batch": args.batch, "ops": ops,
              "extra_over_base": {
                  k: {kind: round(ops[k][kind] / ops["base"][kind] - 1, 4) for kind in ("all", "compute")}
                  for k in ("memory_read", "memory_read_write")},
              "most_common_extra": (both["ops"] - bare["ops"]).most_common(20)}
    result["wall_ms_per_segment"] = {k: round(min(v), 3) for k, v in walls.items()}
    result["wall_over_base"] = {k: round(min(walls[k]) / min(walls["base"]), 4) for k in walls}
    if cuda:
        result["kernel_ms_per_segment"] = {k: round(v["kernel_us"] / 1e3, 3) for k, v in systems.items()}
        syncs = {k: host_syncs(f) for k, f in fns.items()}
        result["host_syncs_per_segment"] = {k: n for k, (n, _) in syncs.items()}
        result["host_syncs_where"] = {k: dict(where.most_common()) for k, (_, where) in syncs.items()}
        kernels = {k: sum(v["kernels"].values()) for k, v in systems.items()}
        result["kernels"] = kernels
        result["extra_over_base"]["kernels"] = {k: round(kernels[k] / kernels["base"] - 1, 4)
                                                for k in ("memory_read", "memory_read_write")}
        result["most_common_extra_kernels"] = (both["kernels"] - bare["kernels"]).most_common(15)
    atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
    keys = ("ops", "extra_over_base", "wall_ms_per_segment", "wall_over_base") + (("kernels", "kernel_ms_per_segment", "host_syncs_per_segment") if cuda else ())
    print(json.dumps({k: result[k] for k in keys}))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
