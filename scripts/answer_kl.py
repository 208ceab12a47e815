#!/usr/bin/env python
"""How far adapter B's answers move from adapter A's: KL(A || B) of the next-token distribution at the answer
position, each after reading the same test samples' contexts (a check that a grown or converted adapter still reads
as the one it came from).

    python scripts/answer_kl.py --a DIR --b DIR2 [--tasks qa1,qa2] [--length 1k] [--seed 11] --out F
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time

import torch

import gma6
from gma6.data.generator import generate_samples
from gma6.io import atomic_write_text


def _answer_logprobs(base, tok, adapter: str, samples, segment_length: int) -> list[torch.Tensor]:
    mm = gma6.load_adapter(base, adapter)
    mm.eval()
    out = []
    try:
        for s in samples:
            ids = tok(s.context, return_tensors="pt").input_ids
            q = tok("\nQuestion: " + s.question + "\nAnswer:", return_tensors="pt").input_ids
            with torch.no_grad():
                state = mm.read(ids, segment_length=segment_length)
                out.append(mm(input_ids=q, memory_state=state, write=False).logits[0, -1].float().log_softmax(-1))
    finally:
        mm.detach()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--a", required=True)
    ap.add_argument("--b", required=True)
    ap.add_argument("--model", default=None)
    ap.add_argument("--tasks", default="qa1,qa2")
    ap.add_argument("--length", default="1k")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--segment-length", type=int, default=256)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    base, tok = gma6.load_base(args.model, dtype=torch.float32, device="cpu", progress=False)
    samples = [generate_samples(t, args.length, 1, split="test", seed=args.seed, tokenizer=tok)[0]
               for t in args.tasks.split(",")]
    a = _answer_logprobs(base, tok, args.a, samples, args.segment_length)
    b = _answer_logprobs(base, tok, args.b, samples, args.segment_length)
    rows = [{"task": s.task, "kl_a_b": round(float((pa.exp() * (pa - pb)).sum()), 5),
             "same_top": int(pa.argmax()) == int(pb.argmax())} for s, pa, pb in zip(samples, a, b)]
    result = {"command": "python " + shlex.join(sys.argv), "date": time.strftime("%Y-%m-%d"), "machine": "cpu",
              "rows": rows}
    print(json.dumps(rows))
    atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
