"""GPU check of ``cuda_graph_read``: the same adapter read eagerly and from CUDA graphs over the same segments, in one
process — memory states and answering logits compared, and a segment's read + write timed against the bare base.

    python scripts/gpu_graph_read_check.py --model M [--adapter DIR] [--batch 8] [--tokens 1024] [--segments 6] [--out F]
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--adapter", default=str(default_adapter()))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--segments", type=int, default=6)
    ap.add_argument("--pairs", type=int, default=24)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    base, _ = gma6.load_base(args.model, dtype=torch.bfloat16, device="cuda", progress=False)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 1000, (args.batch, args.tokens * args.segments), generator=g).cuda()
    question = torch.randint(3, 1000, (args.batch, 64), generator=g).cuda()
    got = {}
    for graphed in (False, True):
        mm = gma6.load_adapter(base, args.adapter, cuda_graph_read=graphed)
        with torch.no_grad():
            state = mm.read(ids, segment_length=args.tokens)
            state = mm.read(ids, segment_length=args.tokens)  # the second pass replays what the first captured
            logits = mm(input_ids=question, memory_state=state, write=False).logits.float()
            seg = ids[:, : args.tokens]
            mask = torch.ones_like(seg, dtype=torch.bool)

            def bare() -> None:
                with mm.memory_disabled():
                    mm.base(input_ids=seg, logits_to_keep=1, use_cache=False)

            step = lambda: mm._read_step(seg, mask, state, full=True)  # noqa: E731
            for _ in range(3):
                step(), bare()
            ratios = []
            for k in range(args.pairs):
                t = {}
                for name, fn in ((("bare", bare), ("memory", step)) if k % 2 == 0 else (("memory", step), ("bare", bare))):
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    fn()
                    torch.cuda.synchronize()
                    t[name] = time.perf_counter() - t0
                ratios.append(t["bare"] / t["memory"])
        got[graphed] = {"state": state.memory.float(), "logits": logits, "ratio": statistics.median(ratios),
                        "graphs": len(mm._graphed._graphs) if mm._graphed is not None else 0}
        mm.detach()
    result = {
        "device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
        "adapter": args.adapter, "batch": args.batch, "tokens": args.tokens, "segments": args.segments,
        "paired_memory_over_bare": {"eager": round(got[False]["ratio"], 4), "graphed": round(got[True]["ratio"], 4)},
        "graphs_captured": got[True]["graphs"],
        "max_abs_state_diff": float((got[True]["state"] - got[False]["state"]).abs().max()),
        "max_abs_logit_diff": float((got[True]["logits"] - got[False]["logits"]).abs().max()),
        "same_argmax_share": float((got[True]["logits"].argmax(-1) == got[False]["logits"].argmax(-1)).float().mean()),
    }
    print(json.dumps(result))
    if args.out:
        atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
