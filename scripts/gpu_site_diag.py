#!/usr/bin/env python
"""Diagnose the fused attention-site read on a GPU: does every layer's slot preparation stack (and if not,
which condition fails), and where does a training step's NaN come from (SDPA backward with -inf mask
entries, gradient checkpointing, the 8-segment stage)?

    python scripts/gpu_site_diag.py --model M [--adapter DIR]
"""
from __future__ import annotations

import argparse
import dataclasses

import torch
from torch import nn

import gma6
from gma6.base import default_adapter
from gma6.integration import rms_gain


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--adapter", default=str(default_adapter()))
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    base, tok = gma6.load_base(args.model, dtype=torch.bfloat16, device=dev, progress=False)
    cfg = dataclasses.replace(gma6.GMA6Config.load(args.adapter), lora_rank=0)
    mm = gma6.attach_memory(base, cfg)
    r0 = mm._base_reads[0]
    print("applies", mm._stacked.applies(), "sites", mm._sites is not None, "implementation",
          base.config._attn_implementation, "torch", torch.__version__)
    for i, r in enumerate(mm._base_reads[:3]):
        print(i, "k_proj", type(r.attn.k_proj).__name__, "fusable", r.fusable, "q_fold", r._q_fold is not None,
              "k_fold", r._k_fold is not None, "k_norm", type(r.k_norm).__name__,
              "bias", r.attn.k_proj.bias is None, "rms_gain(k_norm)", None if rms_gain(r.k_norm, r.head_dim) is None else "ok")
    mm.detach()
    # SDPA backward with a mask whose slot columns are all -inf (an empty memory) and a finite sink column
    q = torch.randn(8, 4, 256, 256, device=dev, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(8, 1, 129, 256, device=dev, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(8, 1, 129, 256, device=dev, dtype=torch.bfloat16, requires_grad=True)
    for fill in (float("-inf"), -1e4):
        mask = torch.full((8, 1, 1, 129), fill, device=dev, dtype=torch.bfloat16)
        mask[..., -1] = 0.0
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        out.float().square().sum().backward()
        print("sdpa mask fill", fill, "out finite", bool(torch.isfinite(out).all()),
              "grads finite", all(bool(torch.isfinite(t.grad).all()) for t in (q, k, v)))
        q.grad = k.grad = v.grad = None
    # a few training steps of the adapter as it trains (its LoRA on), 2 and 8 segments, with/without checkpointing
    for segs, ck in ((2, False), (8, False), (8, True)):
        mm = gma6.load_adapter(base, args.adapter, gradient_checkpointing=ck)
        mm.train()
        ids = torch.randint(100, 20000, (4, 256 * segs), device=dev)
        state = None
        for s in range(segs):
            x = ids[:, 256 * s: 256 * (s + 1)]
            out = mm(input_ids=x, memory_state=state, labels=x if s == segs - 1 else None)
            state = out.memory_state
        out.loss.backward()
        grads = [p.grad for p in mm.parameters() if p.grad is not None]
        print("segments", segs, "checkpointing", ck, "loss", float(out.loss),
              "grads finite", all(bool(torch.isfinite(g).all()) for g in grads), len(grads))
        mm.detach()


if __name__ == "__main__":
    main()
