#!/usr/bin/env python
"""How many of the embedded 270M's weights a fine-tuning step changes when they are kept in bf16.

AdamW's first step moves every weight by about ``lr`` (its update is normalised); in bf16 a step
smaller than half a weight's spacing rounds away. Prints the fraction of weights a 1e-5 step changes
(why ``gma6 bench`` times a half-precision full fine-tune with fp32 master weights by default).

    python benchmarks/bf16_update_rounding.py [--lr 1e-5]
"""
from __future__ import annotations

import argparse

import torch

import gma6

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--lr", type=float, default=1e-5)
args = ap.parse_args()
torch.manual_seed(0)
model, _ = gma6.load_base(progress=False)
total = changed = 0
for p in model.parameters():
    w = p.detach().to(torch.bfloat16)
    stepped = (w.float() - args.lr * torch.sign(torch.randn_like(w.float()))).to(torch.bfloat16)
    changed += int((stepped != w).sum())
    total += w.numel()
print(f"bf16 weights changed by a {args.lr:g} step: {changed / total:.3%} of {total}")
