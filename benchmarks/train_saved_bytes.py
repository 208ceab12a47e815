#!/usr/bin/env python
"""What a training step keeps for its backward: bytes of the tensors autograd saves (each storage once),
the memory-only step against the frozen floor (``gma6 bench``'s ``train_frozen``: the bare base's forward
with a free adapter at its embeddings). Deterministic, so it works on this CPU where peak RSS is noisy.

    python benchmarks/train_saved_bytes.py [--adapter DIR] [--dtype bfloat16] [--batch 2] [--context 1024]
        [--segment 512] [--positions 16] [--device cpu] [--top 12] [--out results/train-saved-bytes-cpu.json]

On CUDA it also records each step's peak allocated memory (``torch.cuda.max_memory_allocated``, weights
included). ``top``: the largest groups of saved storages by shape and dtype, to see what a step keeps.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time

import torch
import torch.nn.functional as F
from torch.autograd.graph import saved_tensors_hooks

import gma6
from gma6.base import default_adapter
from gma6.io import atomic_write_text
from gma6.model import split_segments


def saved_bytes(step, device: torch.device) -> tuple[int, dict[str, float], float | None]:
    """Bytes of the distinct storages autograd saves while ``step()`` builds its graph, those bytes grouped by
    the saving tensor's shape and dtype (MiB), and on CUDA the step's peak allocated GiB."""
    seen: dict[int, int] = {}
    groups: dict[int, str] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.nbytes() > seen.get(s.data_ptr(), -1):
            seen[s.data_ptr()] = s.nbytes()
            groups[s.data_ptr()] = f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}"
        return t

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    with saved_tensors_hooks(pack, lambda t: t):
        loss = step()
    loss.backward()
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
    by_group: dict[str, float] = {}
    for ptr, n in seen.items():
        by_group[groups[ptr]] = by_group.get(groups[ptr], 0.0) + n / 2**20
    return sum(seen.values()), by_group, peak


def _top(groups: dict[str, float], n: int) -> dict[str, float]:
    return {k: round(v, 1) for k, v in sorted(groups.items(), key=lambda kv: -kv[1])[:n]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapter", default=str(default_adapter()))
    ap.add_argument("--model", default=None, help="base model (default: the embedded Gemma 3 270M)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--segment", type=int, default=512)
    ap.add_argument("--positions", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--top", type=int, default=12, help="largest saved-tensor groups to list")
    ap.add_argument("--out", default="results/train-saved-bytes-cpu.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    device = torch.device(args.device)
    model, _ = gma6.load_base(args.model, progress=False, dtype=getattr(torch, args.dtype), device=device)
    ids = torch.randint(0, 1000, (args.batch, args.context), device=device)
    segs = split_segments(ids, torch.ones_like(ids, dtype=torch.bool), args.segment)
    pos = torch.linspace(0, args.segment - 2, args.positions, device=device).round().long().unique()

    def loss_at(logits: torch.Tensor, seg_ids: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float().flatten(0, 1), seg_ids[:, pos + 1].flatten())

    mm = gma6.load_adapter(model, args.adapter)

    def memory_step() -> torch.Tensor:
        state, loss = mm.init_state(args.batch), 0.0
        for seg_ids, seg_mask in segs:
            out = mm(input_ids=seg_ids, attention_mask=seg_mask, logits_to_keep=pos, memory_state=state)
            state, loss = out.memory_state, loss + loss_at(out.logits, seg_ids)
        return loss

    memory, memory_groups, memory_peak = saved_bytes(memory_step, device)
    base = mm.detach()
    base.requires_grad_(False)  # detach() hands the base back as it came (a fresh load trains every weight)
    probe = torch.nn.Parameter(torch.zeros((), device=device))
    handle = base.get_input_embeddings().register_forward_hook(lambda m, i, out: out + probe.to(out.dtype))

    def frozen_step() -> torch.Tensor:
        loss = 0.0
        for seg_ids, seg_mask in segs:
            loss = loss + loss_at(base(input_ids=seg_ids, attention_mask=seg_mask.long(), logits_to_keep=pos).logits, seg_ids)
        return loss

    try:
        floor, floor_groups, floor_peak = saved_bytes(frozen_step, device)
    finally:
        handle.remove()
    result = {
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "date": time.strftime("%Y-%m-%d"),
        "machine": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "device": device.type, "dtype": args.dtype,
        "adapter": args.adapter, "batch": args.batch, "context": args.context, "segment": args.segment,
        "positions": len(pos), "saved_mib": {"train_memory": round(memory / 2**20, 1), "train_frozen": round(floor / 2**20, 1)},
        "train_memory_over_train_frozen": round(memory / floor, 4),
        "peak_gib": None if memory_peak is None else {"train_memory": round(memory_peak, 3), "train_frozen": round(floor_peak, 3)},
        "top_saved_mib": {"train_memory": _top(memory_groups, args.top), "train_frozen": _top(floor_groups, args.top)},
    }
    print(json.dumps(result, indent=1))
    atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
