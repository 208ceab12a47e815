#!/usr/bin/env python
"""A saved adapter with its read adapters (``read_rank``) grown to a higher rank, computing the same function: each
``LowRank``'s down projection gets new rows (initialised as a fresh one would be) and its up projection new
columns of zeros, so ``U V x`` is unchanged until training moves them. A start for training more read capacity.
``--persistent-slots P`` adds P learned slots a layer (``GMA6Config.persistent_slots``, initialised as a fresh
controller's: nearly unread at first, so nearly the same function).

    python scripts/grow_read_rank.py --adapter DIR [--rank 32] [--persistent-slots 8 [--persistent-reads answer]] --out DIR2
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
from gma6.memory.controller import MemoryController
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


def _read_width(tensors: dict[str, torch.Tensor], config: GMA6Config) -> int | None:
    """The attention-site read's width, from the saved gate (heads x head width)."""
    if config.read_site != "attention":
        return None
    return int(next(v for k, v in tensors.items() if k.endswith("base_gate")).shape[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapter", required=True, type=Path)
    ap.add_argument("--rank", type=int, default=None)
    ap.add_argument("--persistent-slots", type=int, default=None)
    ap.add_argument("--persistent-logit", type=float, default=None,
                    help="their starting logit bias (default the controller's, -4; lower: the grown adapter reads "
                         "nearer the original)")
    ap.add_argument("--persistent-reads", choices=("always", "answer"), default=None,
                    help="when they are read (GMA6Config.persistent_reads; default always)")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    config = GMA6Config.load(args.adapter)
    if args.rank is None and args.persistent_slots is None:
        raise SystemExit("give --rank and/or --persistent-slots")
    if args.persistent_reads is not None and args.persistent_slots is None:
        raise SystemExit("--persistent-reads says when --persistent-slots are read: give both")
    tensors = load_file(args.adapter / WEIGHTS)
    if args.rank is not None:
        if not 0 < config.read_rank < args.rank:
            raise SystemExit(f"{args.adapter} has read_rank={config.read_rank}: --rank must be larger (and it must have one)")
        tensors = grow(tensors, args.rank, args.seed)
        config.read_rank = args.rank
    if args.persistent_slots is not None:
        if config.persistent_slots or args.persistent_slots <= 0 or config.read_rule != "base":
            raise SystemExit(f"--persistent-slots {args.persistent_slots}: needs a positive count and an adapter of the "
                             f"base read without any (it has read_rule={config.read_rule!r}, "
                             f"persistent_slots={config.persistent_slots})")
        torch.manual_seed(args.seed)
        config.persistent_slots = args.persistent_slots
        if args.persistent_reads is not None:
            config.persistent_reads = args.persistent_reads
        fresh = MemoryController(config, _read_width(tensors, config)).state_dict()
        tensors.update({k: v for k, v in fresh.items() if k.startswith("persistent")})
        if args.persistent_logit is not None:
            tensors["persistent_logit"] = torch.full_like(tensors["persistent_logit"], args.persistent_logit)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out / WEIGHTS, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, tmp))
    config.save(args.out)
    record = {"command": "python " + shlex.join(sys.argv), "date": time.strftime("%Y-%m-%d"), "from": str(args.adapter)}
    atomic_write_text(args.out / "growth.json", json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
