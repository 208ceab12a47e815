#!/usr/bin/env python
"""Where the memory's perplexity cost on held-out text sits: per-token NLL, memory vs bare, by segment and
by token (the tokens it hurts most, with their context).

Usage: python scripts/perplexity_tokens.py HELD_OUT.txt [--adapter DIR] [--tokens 2048] [--segment-length 256]
    [--top 10] [--out results/perplexity-tokens-cpu.json]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import sys
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F

import gma6
from gma6.base import default_adapter
from gma6.io import atomic_write_text
from gma6.model import split_segments


def token_nll(mm, ids: torch.Tensor, segment_length: int, bos: int | None, disabled: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per segment: the NLL of each of its tokens after the first, and those tokens' ids, the memory carried."""
    state, nll, targets = None, [], []
    for seg, mask in split_segments(ids, torch.ones_like(ids, dtype=torch.bool), segment_length, bos):
        with mm.memory_disabled() if disabled else nullcontext():
            out = mm(input_ids=seg, attention_mask=mask, memory_state=state)
        state = out.memory_state
        nll.append(-F.log_softmax(out.logits[0, :-1].float(), -1).gather(-1, seg[0, 1:, None])[:, 0])
        targets.append(seg[0, 1:])
    return nll, targets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("held_out")
    ap.add_argument("--adapter", default=str(default_adapter()))
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--segment-length", type=int, default=256)
    ap.add_argument("--top", type=int, default=10)
    ap.add_argument("--out", default="results/perplexity-tokens-cpu.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    model, tok = gma6.load_base(progress=False)
    text = open(args.held_out, encoding="utf-8", errors="replace").read()
    ids = torch.tensor([tok.encode(text, add_special_tokens=False)[: args.tokens]])
    mm = gma6.load_adapter(model, args.adapter)
    with torch.no_grad():
        bare, targets = token_nll(mm, ids, args.segment_length, tok.bos_token_id, disabled=True)
        mem, _ = token_nll(mm, ids, args.segment_length, tok.bos_token_id, disabled=False)
    mm.detach()
    b, m, t = torch.cat(bare), torch.cat(mem), torch.cat(targets)
    d = m - b
    order = d.sort(descending=True).indices
    top = order[: args.top]
    flat = t.tolist()
    worst = [{"delta_nats": round(d[j].item(), 3), "bare_nats": round(b[j].item(), 3), "token": tok.decode(flat[j:j + 1]),
              "after": tok.decode(flat[max(0, j - 8):j])} for j in top.tolist()]
    rest = d.sum().item() - d[top].sum().item()
    result = {
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "date": time.strftime("%Y-%m-%d"),
        "device": "cpu", "machine": platform.processor() or platform.machine(), "dtype": "float32",
        "held_out": args.held_out, "adapter": args.adapter, "tokens": int(b.numel()), "segment_length": args.segment_length,
        "ratio": round(math.exp(d.mean().item()), 4),
        "ratio_without_top": round(math.exp(rest / b.numel()), 4),
        "fraction_worse": round((d > 0).float().mean().item(), 4), "fraction_better": round((d < 0).float().mean().item(), 4),
        "mean_abs_delta_nats": round(d.abs().mean().item(), 4),
        "delta_nats_by_segment": [round((mi - bi).mean().item(), 4) for mi, bi in zip(mem, bare)],
        "worst_tokens": worst,
    }
    print(json.dumps(result, indent=1))
    atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
