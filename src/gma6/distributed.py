"""Data-parallel training across processes (``torchrun``, ``accelerate launch``, or any launcher that sets up
``torch.distributed``): each process trains a replica of the memory on its own rows of every batch, and the
gradients are averaged before each optimizer step, so the replicas stay equal.

Why not ``DistributedDataParallel``: the trainable part is a few MB of memory weights inside a frozen base whose
forward runs segment by segment with the memory carried; one all-reduce of the flattened gradients a step is all
the synchronisation this needs, and it leaves the model and its hooks as they are (no wrapper to see through).

``Replicas`` is what ``gma6.training.train`` asks: with no process group it is a single replica and every call is
free, so the same loop runs on one CPU, one GPU or many.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class Replicas:
    """This process's place among the data-parallel replicas: ``rank`` of ``world``."""

    rank: int = 0
    world: int = 1

    @classmethod
    def current(cls) -> Replicas:
        """From the initialised default process group; one replica when there is none."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def main(self) -> bool:
        """The replica that writes logs, checkpoints and the adapter."""
        return self.rank == 0

    def rows(self, n: int) -> range:
        """This replica's rows of a batch of ``n``: every ``world``-th from ``rank`` (strided, so each replica gets
        the same mix of a round-robin task list)."""
        if n % self.world:
            raise ValueError(f"batch of {n} rows cannot be split evenly over {self.world} processes: "
                             f"use a batch size divisible by {self.world}")
        return range(self.rank, n, self.world)

    def average_gradients(self, params: Iterable[nn.Parameter]) -> None:
        """Replace each gradient by its mean over the replicas (a missing one counts as zeros; one missing on every
        replica stays missing, so the optimizer skips it as it would in one process). One all-reduce of a flat
        buffer per device and dtype."""
        if self.world == 1:
            return
        groups: dict[tuple[torch.device, torch.dtype], list[nn.Parameter]] = {}
        missing: list[nn.Parameter] = []
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
                missing.append(p)
            groups.setdefault((p.grad.device, p.grad.dtype), []).append(p)
        for group in groups.values():
            flat = torch.cat([p.grad.reshape(-1) for p in group])
            dist.all_reduce(flat)
            flat /= self.world
            offset = 0
            for p in group:
                n = p.grad.numel()
                p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
                offset += n
        for p in missing:
            if not p.grad.any():
                p.grad = None

    def _sum(self, values: list[float], device: torch.device) -> list[float]:
        """``values`` summed element-wise over the replicas: one all-reduce (float64)."""
        if self.world == 1:
            return [float(v) for v in values]
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()

    def mean(self, values: dict[str, float | None], device: torch.device) -> dict[str, float | None]:
        """Each value's mean over the replicas (None stays None: every replica computes the same terms)."""
        keys = [k for k, v in values.items() if v is not None]
        sums = self._sum([values[k] for k in keys], device)  # type: ignore[misc]
        return {**values, **{k: v / self.world for k, v in zip(keys, sums)}}

    def shares(self, counts: list[float], device: torch.device) -> list[float]:
        """For means taken over this replica's ``counts`` items (answer tokens, questions): the factor that makes
        the replicas' average of those means the mean over all their items, ``count * world / total``. Replicas
        can hold different numbers (a story has as many extra questions as its facts allow)."""
        if self.world == 1:
            return [1.0] * len(counts)
        return [c * self.world / max(n, 1e-12) for c, n in zip(counts, self._sum(counts, device))]

    def total(self, value: float, device: torch.device) -> float:
        """``value`` summed over the replicas."""
        return self._sum([value], device)[0]

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every replica when it is True on any (a decision they must take together, e.g. to stop)."""
        if self.world == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def init_from_environment() -> tuple[Replicas, str | None]:
    """Start the default process group when a launcher asked for several processes (``WORLD_SIZE`` > 1 in the
    environment, as torchrun and accelerate set it) and none is running; return this process's ``Replicas`` and
    the device it should use (``cuda:LOCAL_RANK`` where CUDA is there, else None: the caller's choice).
    NCCL between GPUs, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or not dist.is_available():
        return Replicas.current(), None
    device = None
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not dist.is_initialized():
        if device is not None:
            # Bound to this process's GPU: NCCL otherwise guesses the device from the global rank (it warned so on
            # two H200s) and its barriers run on whatever device is current.
            dist.init_process_group(backend="nccl", device_id=torch.device(device))
        else:
            dist.init_process_group(backend="gloo")
    return Replicas.current(), device
