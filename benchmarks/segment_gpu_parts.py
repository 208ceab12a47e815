#!/usr/bin/env python
"""GPU time of the parts of one segment, without host time: each part captured in a CUDA graph and replayed, timed
with CUDA events — the bare base, the memory's full segment (``read()``'s step: read + write), its read alone
(``write=False``), and, alone, the write of collected hidden states and the slots' preparation for the read. Then a
torch.profiler table of the kernels the memory's segment runs beyond the bare base's (by name: count and GPU time a
segment). What the memory costs a replayed segment (``cuda_graph_segments``) is the GPU time these parts add.

    python benchmarks/segment_gpu_parts.py [--model M | --shape benchmarks/gemma3-270m-config.json] [--adapter DIR]
        [--batch 8] [--tokens 1024] [--repeats 20] [--no-triton-read] [--no-triton-write] [--ops] [--out F]

``--shape``: a base of that config with random weights (no checkpoint to stage: the kernels and their times are the
same as the real model's at the same shapes; what the write selects differs, not what it costs).
"""
from __future__ import annotations

import argparse
import collections
import json
import shlex
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

import gma6
from gma6.base import default_adapter
from gma6.bench import random_model
from gma6.io import atomic_write_text


def gpu_ms(fn, repeats: int) -> float:
    """Median GPU milliseconds of ``fn`` replayed from a CUDA graph (no host time between its kernels)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return round(sorted(times)[len(times) // 2], 4)


def kernel_table(fn, iters: int = 5) -> dict[str, tuple[float, float]]:
    """Per kernel name: (calls, GPU microseconds) a call of ``fn``, from torch.profiler."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    table: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            row = table[e.name[:90]]
            row[0] += 1 / iters
            row[1] += e.device_time / iters
    return {k: (round(c, 2), round(us, 2)) for k, (c, us) in table.items()}


def op_table(fn, iters: int = 5) -> dict[str, tuple[float, float]]:
    """Per operator and input shapes: (calls, GPU microseconds of its own kernels) a call of ``fn``."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    out = {}
    for e in prof.key_averages(group_by_input_shape=True):
        if e.self_device_time_total > 0:
            out[f"{e.key} {e.input_shapes}"[:160]] = (round(e.count / iters, 2), round(e.self_device_time_total / iters, 2))
    return out


def diff(mem: dict, bare: dict, top: int) -> dict:
    """What ``mem``'s table has beyond ``bare``'s, the largest GPU time first."""
    extra = {}
    for name, (calls, us) in mem.items():
        c0, u0 = bare.get(name, (0.0, 0.0))
        if abs(us - u0) > 1 or calls != c0:
            extra[name] = {"calls": round(calls - c0, 2), "us": round(us - u0, 1)}
    return dict(sorted(extra.items(), key=lambda kv: -kv[1]["us"])[:top])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--shape", default=None, help="a config.json: a base of its shape with random weights")
    ap.add_argument("--adapter", default=str(default_adapter()))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--triton-read", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--triton-write", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--ops", action="store_true", help="and tables by operator and shapes of the read, the write "
                    "and the slots' preparation")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("segment_gpu_parts.py times CUDA graphs: it needs a CUDA device")
    if args.shape:
        base = random_model(args.shape, torch.bfloat16, "cuda")
    else:
        base, _ = gma6.load_base(args.model, dtype=torch.bfloat16, device="cuda", progress=False)
    mm = gma6.load_adapter(base, args.adapter, triton_read=args.triton_read, triton_write=args.triton_write)
    g = torch.Generator().manual_seed(0)
    segments = [torch.randint(3, 1000, (args.batch, args.tokens), generator=g).cuda() for _ in range(4)]
    mask = torch.ones_like(segments[0], dtype=torch.bool)
    parts: dict = {}
    with torch.no_grad(), mm._reading():
        state = mm.init_state(args.batch)
        for ids in segments[:3]:  # slots written, as a document's fourth segment sees them
            state = mm._read_step(ids, mask, state, full=True)
        ids = segments[3]
        caught: list[torch.Tensor] = []
        write = mm.controller.write
        mm.controller.write = lambda st, hs, *rest: (caught.extend(h.clone() for h in hs), write(st, hs, *rest))[1]
        try:
            mm._read_step(ids, mask, state, full=True)
        finally:
            del mm.controller.write  # the class's method again
        hiddens = caught[: len(mm.config.layers)]

        def bare() -> None:
            with mm.memory_disabled():
                mm.base(input_ids=ids, logits_to_keep=1, use_cache=False)

        parts = {
            "bare": bare,
            "read_write": lambda: mm._graph_step(ids, mask, state.memory, state.usage, state.age, state.tokens_read),
            "read_only": lambda: mm._segment(ids, mask, state, None, False, False, packed=True, full=True,
                                             logits_to_keep=1),
            "write_alone": lambda: mm.controller.write(state, hiddens, mask, False, True),
            "slots_alone": lambda: mm._prepare_site(mm._make_call(state, write=True), args.batch),
        }
        times = {name: gpu_ms(fn, args.repeats) for name, fn in parts.items()}
        print("GPU ms a segment:", times)
        bare_k, mem_k = kernel_table(parts["bare"]), kernel_table(parts["read_write"])
        extra = diff(mem_k, bare_k, args.top)
        ops = {"read_only_over_bare": diff(op_table(parts["read_only"]), op_table(bare), args.top),
               "write_alone": diff(op_table(parts["write_alone"]), {}, args.top),
               "slots_alone": diff(op_table(parts["slots_alone"]), {}, args.top)} if args.ops else None
    result = {
        "command": "python " + shlex.join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name(), "torch": torch.__version__,
        "base": args.shape and f"random weights, shape of {args.shape}" or (args.model or "embedded default"),
        "adapter": args.adapter, "batch": args.batch, "tokens": args.tokens, "triton_read": args.triton_read,
        "triton_write": args.triton_write,
        "gpu_ms": times,
        "memory_over_bare_gpu": round(times["bare"] / times["read_write"], 4),
        "kernels": {"bare": {"calls": round(sum(c for c, _ in bare_k.values()), 1),
                             "us": round(sum(u for _, u in bare_k.values()), 1)},
                    "memory": {"calls": round(sum(c for c, _ in mem_k.values()), 1),
                               "us": round(sum(u for _, u in mem_k.values()), 1)}},
        "extra_kernels": extra,
        "ops": ops,
    }
    for title, table in [("kernels beyond the bare base's", extra), *(ops or {}).items()]:
        print(title)
        for name, row in table.items():
            print(f"{row['us']:9.1f} us {row['calls']:6.1f}x  {name}")
    print(json.dumps({k: result[k] for k in ("gpu_ms", "memory_over_bare_gpu", "kernels")}))
    if args.out:
        atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
