"""Probe (GPU): a segment's read (read + write) with each layer's read eager and compiled in several torch.compile
modes, against the bare base over the same segment, in one process (the systems alternate).

    python scripts/gpu_read_compile_probe.py --model M [--adapter DIR] [--batch 8] [--tokens 1024] [--pairs 24] [--out F]

Each variant replaces the model's compiled read (``compile_read``'s ``site_read``); its logits and memory are checked
against the eager read's. Prints and writes {"device", "date", "torch", "rows": {variant: {...}}}.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import gma6
from gma6.base import default_adapter
from gma6.io import atomic_write_text
from gma6.memory.base_read import site_read


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn) -> float:
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--adapter", default=str(default_adapter()))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--pairs", type=int, default=24)
    ap.add_argument("--variants", default="eager,default,static,max-autotune-no-cudagraphs,reduce-overhead")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    base, _ = gma6.load_base(args.model, dtype=getattr(torch, args.dtype), device=args.device, progress=False)
    mm = gma6.load_adapter(base, args.adapter, compile_read=True)
    g = torch.Generator().manual_seed(0)
    segments = [torch.randint(3, 1000, (args.batch, args.tokens), generator=g).to(args.device) for _ in range(4)]
    mask = torch.ones_like(segments[0], dtype=torch.bool)
    with torch.no_grad():
        mm._compiled_read = None
        state = mm.init_state(args.batch)
        for ids in segments[:3]:  # a memory with slots written, as a document's fourth segment sees it
            state = mm._read_step(ids, mask, state, full=True)
        ids = segments[3]
        ref = mm(input_ids=ids, memory_state=state, logits_to_keep=1)
    makers = {
        "eager": lambda: None,
        "default": lambda: torch.compile(site_read, fullgraph=True, dynamic=True),
        "static": lambda: torch.compile(site_read, fullgraph=True, dynamic=False),
        "max-autotune-no-cudagraphs": lambda: torch.compile(site_read, fullgraph=True, dynamic=False,
                                                            mode="max-autotune-no-cudagraphs"),
        "reduce-overhead": lambda: torch.compile(site_read, fullgraph=True, dynamic=False, mode="reduce-overhead"),
    }

    def bare() -> None:
        with mm.memory_disabled():
            mm.base(input_ids=ids, logits_to_keep=1, use_cache=False)

    step = lambda: mm._read_step(ids, mask, state, full=True)
    rows = {}
    for name in args.variants.split(","):
        torch._dynamo.reset()
        try:
            mm._compiled_read = makers[name]()
            t0 = time.time()
            with torch.no_grad():
                for _ in range(3):
                    step()
                got = mm(input_ids=ids, memory_state=state, logits_to_keep=1)
                compile_s = time.time() - t0
                ratios, walls, bares = [], [], []
                for k in range(args.pairs):
                    pair = (("bare", bare), ("memory", step)) if k % 2 == 0 else (("memory", step), ("bare", bare))
                    t = {n: timed(f) for n, f in pair}
                    ratios.append(t["bare"] / t["memory"])
                    walls.append(t["memory"])
                    bares.append(t["bare"])
            rows[name] = {"paired_median_memory_over_bare": round(statistics.median(ratios), 4),
                          "memory_ms": round(1e3 * statistics.median(walls), 3),
                          "bare_ms": round(1e3 * statistics.median(bares), 3),
                          "warmup_s": round(compile_s, 1),
                          "max_abs_logit_diff_vs_eager": float((got.logits.float() - ref.logits.float()).abs().max()),
                          "max_abs_memory_diff_vs_eager": float((got.memory_state.memory.float()
                                                                 - ref.memory_state.memory.float()).abs().max())}
        except Exception as e:  # a probe: report and go on
            rows[name] = {"error": f"{type(e).__name__}: {e}"[:600]}
        print(name, rows[name], flush=True)
    result = {"device": torch.cuda.get_device_name() if args.device == "cuda" else args.device, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
              "adapter": args.adapter, "batch": args.batch, "tokens": args.tokens, "pairs": args.pairs, "rows": rows}
    if args.out:
        atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
