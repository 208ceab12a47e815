#!/usr/bin/env python
"""A saved adapter with its read adapters (``read_rank``) grown to a higher rank, computing the same function: each
``LowRank``'s down projection gets new rows (initialised as a fresh one would be) and its up projection new
columns of zeros, so ``U V x`` is unchanged until training moves them. A start for training more read capacity.

    python scripts/grow_read_rank.py --adapter DIR --rank 32 --out DIR2
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from gma6.config import GMA6Config
from gma6.io import atomic_write, atomic_write_text

WEIGHTS = "memory_adapter.safetensors"


def grow(tensors: dict[str, torch.Tensor], rank: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """``tensors`` (a memory adapter's state dict) with every ``read_{q,k,v}`` grown to ``rank``."""
    g = torch.Generator().manual_seed(seed)
    out = dict(tensors)
    for name, w in tensors.items():
        if ".read_" not in name:
            continue
        if name.endswith(".down.weight"):  # (r, H): new rows as nn.Linear's default init (uniform, 1/sqrt(H))
            r, h = w.shape
            bound = 1 / h ** 0.5
            new = (torch.rand(rank - r, h, generator=g, dtype=torch.float32) * 2 - 1) * bound
            out[name] = torch.cat([w, new.to(w.dtype)], 0)
        elif name.endswith(".up.weight"):  # (out, r): zero columns, so the function is unchanged
            o, r = w.shape
            out[name] = torch.cat([w, w.new_zeros(o, rank - r)], 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapter", required=True, type=Path)
    ap.add_argument("--rank", required=True, type=int)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    config = GMA6Config.load(args.adapter)
    if not 0 < config.read_rank < args.rank:
        raise SystemExit(f"{args.adapter} has read_rank={config.read_rank}: --rank must be larger (and it must have one)")
    tensors = grow(load_file(args.adapter / WEIGHTS), args.rank, args.seed)
    config.read_rank = args.rank
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out / WEIGHTS, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, tmp))
    config.save(args.out)
    record = {"command": "python " + shlex.join(sys.argv), "date": time.strftime("%Y-%m-%d"), "from": str(args.adapter)}
    atomic_write_text(args.out / "growth.json", json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
