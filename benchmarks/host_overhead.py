#!/usr/bin/env python
"""What the memory costs the host a segment: the bare base against the memory reading the same segments, on a
Gemma 3 with the real 270M's stack (18 layers, its local/global pattern, 4 query heads on 1 key-value head) but
tiny widths, so that the arithmetic is negligible and what is timed is Python and operator dispatch.

That is what a launch-bound GPU waits on: on the lent H200 the bare 270M's segment of 8 x 1024 tokens is ~1600
kernels in ~24 ms, and the default kind's memory adds ~8 % kernels but ~45 % time (results/session13/). A change
that cuts this host time should show on the GPU; this runs on any CPU, in seconds.

    python benchmarks/host_overhead.py --out results/host-overhead-cpu.json [--adapter DIR] [--profile 25]

Writes {"command", "date", "machine", "config", "rows": [{"system", "ms_per_segment"}], "ratio", "extra_ms",
"profile"}: medians over paired repeats (base and memory alternate), and with --profile the memory run's
heaviest gma6 functions by their own time (cProfile).
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import datetime as dt
import json
import platform
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

from gma6 import GMA6Config
from gma6.base import default_adapter
from gma6.bench import _runner
from gma6.io import atomic_write_text
from gma6.model import attach_memory


def stack_like_270m(hidden: int = 64, vocab: int = 512, seed: int = 0) -> torch.nn.Module:
    """Gemma 3 270M's layer stack (18 layers, every 6th global, GQA 4:1) at a tiny width, random weights."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    types = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(18)]
    cfg = Gemma3TextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=18,
                           num_attention_heads=4, num_key_value_heads=1, head_dim=16, sliding_window=512,
                           layer_types=types, max_position_embeddings=32768, pad_token_id=0, bos_token_id=2,
                           eos_token_id=1)
    cfg._attn_implementation = "sdpa"
    return Gemma3ForCausalLM(cfg).eval()


def kind_of(adapter: Path) -> GMA6Config:
    """The memory config of a saved adapter, without what ties it to its base (so it fits the tiny stack) and
    without its LoRA, as ``gma6 bench --adapter`` times it (a LoRA merges into the base for reading)."""
    return dataclasses.replace(GMA6Config.load(adapter), hidden_size=None, num_hidden_layers=None, model_type=None,
                               lora_rank=0)


def time_paired(runs: dict, repeats: int) -> dict[str, list[float]]:
    """Seconds of each run, alternating, after one warm-up each."""
    for run in runs.values():
        run()
    out: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            t = time.perf_counter()
            run()
            out[name].append(time.perf_counter() - t)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapter", type=Path, default=None, help="whose kind to attach (default: the shipped default)")
    ap.add_argument("--tokens", type=int, default=16, help="tokens a segment")
    ap.add_argument("--segments", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--profile", type=int, default=0, help="list this many gma6 functions by own time (0: none)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.tokens < 1 or args.segments < 1 or args.repeats < 1:
        raise SystemExit("--tokens, --segments and --repeats must be positive")
    torch.set_num_threads(1)
    adapter = args.adapter or default_adapter()
    base = stack_like_270m()
    mm = attach_memory(base, kind_of(adapter))
    ids = torch.randint(3, 500, (1, args.tokens * args.segments), generator=torch.Generator().manual_seed(0))
    runs = {s: _runner(s, mm, ids, args.tokens) for s in ("base_segments", "memory")}
    with torch.no_grad():
        times = time_paired(runs, args.repeats)
        ms = {s: 1e3 * statistics.median(v) / args.segments for s, v in times.items()}
        profile: list[dict] = []
        if args.profile:
            prof = cProfile.Profile()
            prof.runcall(runs["memory"])
            stats = pstats.Stats(prof)
            rows = [(fn, st[2], st[3], st[1]) for fn, st in stats.stats.items() if "gma6" in fn[0]]
            rows.sort(key=lambda r: -r[1])
            profile = [{"function": f"{Path(f[0]).name}:{f[1]}:{f[2]}", "own_ms": round(1e3 * own, 3),
                        "cumulative_ms": round(1e3 * cum, 3), "calls": calls}
                       for f, own, cum, calls in rows[:args.profile]]
    result = {
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])]),
        "date": dt.date.today().isoformat(),
        "machine": f"{platform.machine()} CPU, 1 thread, torch {torch.__version__}",
        "config": {"adapter_kind": str(adapter), "tokens": args.tokens, "segments": args.segments,
                   "repeats": args.repeats, "layers": 18, "hidden": 64},
        "rows": [{"system": s, "ms_per_segment": round(v, 4)} for s, v in ms.items()],
        "ratio": round(ms["memory"] / ms["base_segments"], 4),
        "extra_ms": round(ms["memory"] - ms["base_segments"], 4),
        "profile": profile,
    }
    print(json.dumps({k: result[k] for k in ("rows", "ratio", "extra_ms")}))
    for row in profile:
        print(f"{row['own_ms']:9.3f} {row['cumulative_ms']:9.3f} {row['calls']:6d}  {row['function']}")
    if args.out:
        atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
