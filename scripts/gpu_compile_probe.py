"""Probe (GPU): what torch.compile of the memory's own maths buys a read segment, host-bound.

    python scripts/gpu_compile_probe.py --model M --batch 8 --tokens 1024 [--out F]

Times one read step (read + write) per segment, eager and with the write / the reads compiled
(default mode, then reduce-overhead), against the bare base over the same segment, in one process.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

import gma6
from gma6.io import atomic_write_text


def wall_ms(fn, n: int = 20, rounds: int = 3) -> float:
    with torch.no_grad():
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        best = 1e9
        for _ in range(rounds):
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            torch.cuda.synchronize()
            best = min(best, (time.perf_counter() - t0) / n * 1e3)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    base, _ = gma6.load_base(args.model, dtype=torch.bfloat16, device="cuda", progress=False)
    mm = gma6.attach_memory(base)
    ids = torch.randint(3, 1000, (args.batch, args.tokens), generator=torch.Generator().manual_seed(0)).cuda()
    mask = torch.ones_like(ids, dtype=torch.bool)
    state = mm.init_state(args.batch)
    ctl = mm.controller
    gates = [layer.read_gate for layer in ctl.layers]

    def bare():
        with mm.memory_disabled():
            mm.base(input_ids=ids, logits_to_keep=1, use_cache=False)

    step = lambda: mm._read_step(ids, mask, state, full=True)
    with torch.no_grad():
        ref = step().memory
    rows = {}

    def measure(name):
        t_bare1 = wall_ms(bare)
        t = wall_ms(step)
        t_bare2 = wall_ms(bare)
        with torch.no_grad():
            err = (step().memory - ref).abs().max().item()
        b = min(t_bare1, t_bare2)
        rows[name] = {"bare_ms": round(b, 3), "memory_ms": round(t, 3), "memory_over_bare": round(b / t, 4),
                      "max_abs_err_vs_eager": err}
        print(name, rows[name], flush=True)

    measure("eager")
    for mode in ("default", "reduce-overhead"):
        for what in ("write", "write+reads"):
            torch._dynamo.reset()
            for g in gates:
                g.__dict__.pop("_read_half", None)
            ctl.__dict__.pop("_write_batched", None)
            ctl.__dict__.pop("read_keys_values", None)
            kw = {} if mode == "default" else {"mode": mode}
            ctl._write_batched = torch.compile(type(ctl)._write_batched.__get__(ctl), **kw)
            ctl.read_keys_values = torch.compile(type(ctl).read_keys_values.__get__(ctl), **kw)
            if what == "write+reads":
                for g in gates:
                    g._read_half = torch.compile(type(g)._read_half.__get__(g), **kw)
            t0 = time.time()
            try:
                with torch.no_grad():
                    step(); step(); step()
                print("compiled", mode, what, round(time.time() - t0, 1), "s", flush=True)
                measure(f"{mode}:{what}")
            except Exception as e:  # a probe: report and go on
                rows[f"{mode}:{what}"] = {"error": f"{type(e).__name__}: {e}"[:500]}
                print(mode, what, "failed", rows[f"{mode}:{what}"], flush=True)
    result = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
              "batch": args.batch, "tokens": args.tokens, "rows": rows}
    if args.out:
        atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
