#!/usr/bin/env python
"""Fixed and per-segment cost of a whole read on a GPU, both systems replayed from CUDA graphs: the memory's
``read()`` and the bench's bare-base pass over 1, 2, 4 and 8 segments (alternating, synced around each pass), a
line fitted to each system's median pass times. The fixed part is what a short read pays beyond its segments
(input checks, the state, the weights' key, the GPU idle until the first replay); ``host_ms``: time until the call
returns, before the sync.

    python benchmarks/read_pass_overhead.py [--model M | --shape benchmarks/gemma3-270m-config.json] [--adapter DIR]
        [--batch 8] [--tokens 1024] [--repeats 7] [--trace] [--timeline] [--out F]

``--timeline``: a 4-segment pass of each system cut into its GPU intervals by CUDA events recorded around every
graph replay (no profiler): the GPU idle before the first replay, each replay, the gaps between replays and the
tail after the last one; with the host's time until its first replay.
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
from gma6.bench import _graphed_base, _runner, random_model
from gma6.io import atomic_write_text


def fit(xs: list[int], ys: list[float]) -> tuple[float, float]:
    """Least-squares (intercept, slope)."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - slope * mx, slope


def timeline(runs: dict, repeats: int, segments: int = 4) -> dict:
    """Median GPU milliseconds of each interval of a ``segments``-segment pass (see the module), per system."""
    real_replay = torch.cuda.CUDAGraph.replay
    marks: list = []

    def replay(graph: torch.cuda.CUDAGraph) -> None:
        before = torch.cuda.Event(enable_timing=True)
        before.record()
        real_replay(graph)
        after = torch.cuda.Event(enable_timing=True)
        after.record()
        marks.append((before, after, time.perf_counter()))

    samples: dict = {s: [] for s in ("base_segments", "memory")}
    torch.cuda.CUDAGraph.replay = replay
    try:
        for r in range(repeats):
            for s in (list(samples) if r % 2 == 0 else list(samples)[::-1]):
                marks.clear()
                torch.cuda.synchronize()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                h0 = time.perf_counter()
                start.record()
                runs[(s, segments)]()
                end.record()
                torch.cuda.synchronize()
                if len(marks) != segments:
                    raise RuntimeError(f"{s}: {len(marks)} replays for {segments} segments")
                samples[s].append({
                    "total": start.elapsed_time(end),
                    "before_first_replay": start.elapsed_time(marks[0][0]),
                    "host_until_first_replay": (marks[0][2] - h0) * 1e3,
                    "replays": sum(a.elapsed_time(b) for a, b, _ in marks),
                    "between_replays": sum(marks[i][1].elapsed_time(marks[i + 1][0]) for i in range(segments - 1)),
                    "after_last_replay": marks[-1][1].elapsed_time(end),
                })
    finally:
        torch.cuda.CUDAGraph.replay = real_replay
    return {s: {k: round(statistics.median(x[k] for x in v), 3) for k in v[0]} for s, v in samples.items()}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--shape", default=None)
    ap.add_argument("--adapter", default=str(default_adapter()))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--trace", action="store_true", help="and what each system runs before its first replay")
    ap.add_argument("--timeline", action="store_true", help="GPU intervals of a 4-segment pass from CUDA events")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("read_pass_overhead.py replays CUDA graphs: it needs a CUDA device")
    base = (random_model(args.shape, torch.bfloat16, "cuda") if args.shape else
            gma6.load_base(args.model, dtype=torch.bfloat16, device="cuda", progress=False)[0])
    mm = gma6.load_adapter(base, args.adapter, cuda_graph_segments=True, triton_read=True, triton_write=True)
    graph = _graphed_base(mm)
    counts = (1, 2, 4, 8)
    g = torch.Generator().manual_seed(0)
    ids = {n: torch.randint(3, 1000, (args.batch, n * args.tokens), generator=g).cuda() for n in counts}
    runs = {(s, n): _runner(s, mm, ids[n], args.tokens, graph) for s in ("base_segments", "memory") for n in counts}
    wall: dict = {k: [] for k in runs}
    host: dict = {k: [] for k in runs}
    for fn in runs.values():  # captures and warm-up
        fn()
        fn()
    for r in range(args.repeats):
        for key in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            runs[key]()
            t1 = time.perf_counter()
            torch.cuda.synchronize()
            host[key].append(t1 - t0)
            wall[key].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) * 1e3 for k, v in wall.items()}
    result = {
        "command": "python " + shlex.join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name(), "torch": torch.__version__,
        "batch": args.batch, "tokens": args.tokens,
        "wall_ms": {f"{s}/{n}": round(v, 3) for (s, n), v in med.items()},
        "host_ms": {f"{s}/{n}": round(statistics.median(v) * 1e3, 3) for (s, n), v in host.items()},
    }
    for s in ("base_segments", "memory"):
        fixed, per = fit(list(counts), [med[(s, n)] for n in counts])
        result[s] = {"fixed_ms": round(fixed, 3), "per_segment_ms": round(per, 3)}
    result["ratio_by_segments"] = {n: round(med[("base_segments", n)] / med[("memory", n)], 4) for n in counts}
    if args.timeline:
        result["timeline_4_segments"] = timeline(runs, args.repeats)
        print(json.dumps(result["timeline_4_segments"]))
    if args.trace:  # one 1-segment pass of each under the profiler: what runs before the first replay
        from torch.profiler import ProfilerActivity, profile

        result["before_first_replay"] = {}
        for s in ("base_segments", "memory"):
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                runs[(s, 1)]()
                torch.cuda.synchronize()
            events = sorted(prof.events(), key=lambda e: e.time_range.start)
            start = events[0].time_range.start
            launch = next((e.time_range.start for e in events if e.name == "cudaGraphLaunch"),
                          next((e.time_range.start for e in events if e.device_type == torch.autograd.DeviceType.CUDA),
                               None))
            ops: dict = {}
            for e in events:
                if launch is not None and e.time_range.start < launch and e.device_type != torch.autograd.DeviceType.CUDA:
                    row = ops.setdefault(e.name, [0, 0.0])
                    row[0] += 1
                    row[1] += e.cpu_time_total / 1e3 if hasattr(e, "cpu_time_total") else 0.0
            top = sorted(ops.items(), key=lambda kv: -kv[1][1])[:15]
            result["before_first_replay"][s] = {
                "graph_launch_ms": None if launch is None else round((launch - start) / 1e3, 3),
                "ops": {k: {"calls": c, "cpu_ms": round(ms, 3)} for k, (c, ms) in top}}
        print(json.dumps(result["before_first_replay"]))
    print(json.dumps({k: result[k] for k in ("base_segments", "memory", "ratio_by_segments", "host_ms")}))
    if args.out:
        atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
