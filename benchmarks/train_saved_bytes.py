#!/usr/bin/env python
"""What a training step keeps for its backward: bytes of the tensors autograd saves (each storage once),
the memory-only step against the frozen floor (``gma6 bench``'s ``train_frozen``: the bare base's forward
with a free adapter at its embeddings). Deterministic, so it works on this CPU where peak RSS is noisy.

    python benchmarks/train_saved_bytes.py [--adapter DIR] [--dtype bfloat16] [--batch 2] [--context 1024] [--checkpointing]
        [--segment 512] [--positions 16] [--device cpu] [--top 12] [--out results/train-saved-bytes-cpu.json]

On CUDA it also records each step's peak allocated memory (``torch.cuda.max_memory_allocated``, weights
included). ``top``: the largest groups of saved storages by shape and dtype, to see what a step keeps.
"""

from __future__ import annotations

import argparse
import json

import torch
from torch.autograd.graph import saved_tensors_hooks
from train_steps import TrainSteps, add_arguments

from gma6.io import atomic_write_text


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
    add_arguments(ap, batch=2, context=1024, positions=16, device="cpu")
    ap.add_argument("--top", type=int, default=12, help="largest saved-tensor groups to list")
    ap.add_argument("--out", default="results/train-saved-bytes-cpu.json")
    args = ap.parse_args()
    steps = TrainSteps(args)
    memory, memory_groups, memory_peak = saved_bytes(steps.memory_loss, steps.device)
    with steps.frozen_floor() as frozen_loss:
        floor, floor_groups, floor_peak = saved_bytes(frozen_loss, steps.device)
    result = {
        **steps.header(),
        "saved_mib": {"train_memory": round(memory / 2**20, 1), "train_frozen": round(floor / 2**20, 1)},
        "train_memory_over_train_frozen": round(memory / floor, 4),
        "peak_gib": None if memory_peak is None else {"train_memory": round(memory_peak, 3), "train_frozen": round(floor_peak, 3)},
        "top_saved_mib": {"train_memory": _top(memory_groups, args.top), "train_frozen": _top(floor_groups, args.top)},
    }
    print(json.dumps(result, indent=1))
    atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
