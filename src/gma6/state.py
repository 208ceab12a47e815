"""MemoryState: the memory that goes into a forward and comes out of it, and its snapshots.

Dimensions: B batch, L memory layers, S slots, D slot width.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

STATE_FORMAT = "gma6-state-v1"


@dataclass
class MemoryState:
    """The explicit recurrent state of a memory.

    Attributes:
        memory: slots (B, L, S, D).
        usage: decayed sum of input-gate mass per slot (B, L, S).
        age: segments since each slot's last real write (B, L, S).
        tokens_read: real tokens read so far per sample (B,).
        segments_read: segments written so far.
    """

    memory: torch.Tensor
    usage: torch.Tensor
    age: torch.Tensor
    tokens_read: torch.Tensor
    segments_read: int = 0

    @property
    def batch_size(self) -> int:
        return self.memory.shape[0]

    @property
    def shape(self) -> tuple[int, int, int]:
        """(L, S, D)."""
        return tuple(self.memory.shape[1:])  # type: ignore[return-value]

    def detach(self) -> MemoryState:
        """Cut the graph (truncated backpropagation through segments)."""
        return replace(self, memory=self.memory.detach(), usage=self.usage.detach(), age=self.age.detach())

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> MemoryState:
        return replace(
            self,
            memory=self.memory.to(device=device, dtype=dtype),
            usage=self.usage.to(device=device),
            age=self.age.to(device=device),
            tokens_read=self.tokens_read.to(device=device),
        )

    def select(self, index: torch.Tensor | list[int]) -> MemoryState:
        """The states of some samples of the batch."""
        idx = torch.as_tensor(index, device=self.memory.device)
        return replace(
            self,
            memory=self.memory[idx],
            usage=self.usage[idx],
            age=self.age[idx],
            tokens_read=self.tokens_read[idx],
        )

    def check(self, shape: tuple[int, int, int], batch_size: int | None = None) -> None:
        """Raise ``ValueError`` if this state does not fit a memory of ``shape`` (L, S, D)."""
        if not isinstance(self, MemoryState):
            raise TypeError(f"memory_state must be a MemoryState, got {type(self).__name__}")
        if tuple(self.shape) != tuple(shape):
            raise ValueError(
                f"memory_state has (layers, slots, width) = {tuple(self.shape)}, but this memory "
                f"expects {tuple(shape)}: the state comes from another config"
            )
        if batch_size is not None and self.batch_size != batch_size:
            raise ValueError(f"memory_state has batch size {self.batch_size}, but the input has {batch_size}")


def save_state(state: MemoryState, path: str | os.PathLike, metadata: dict[str, Any] | None = None) -> Path:
    """Write a snapshot (safetensors, with a JSON header in its metadata) atomically."""
    from safetensors.torch import save_file

    from .io import atomic_write

    header = {"format": STATE_FORMAT, "segments_read": state.segments_read, "metadata": metadata or {}}
    tensors = {
        "memory": state.memory.detach().contiguous().cpu(),
        "usage": state.usage.detach().contiguous().cpu(),
        "age": state.age.detach().contiguous().cpu(),
        "tokens_read": state.tokens_read.detach().contiguous().cpu(),
    }
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"gma6": json.dumps(header)}))


def load_state(path: str | os.PathLike, device: torch.device | str = "cpu") -> MemoryState:
    """Read a snapshot written by ``save_state``; damaged or foreign files raise ``ValueError``."""
    state, _ = load_state_with_metadata(path, device)
    return state


def load_state_with_metadata(path: str | os.PathLike, device: torch.device | str = "cpu") -> tuple[MemoryState, dict[str, Any]]:
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such memory snapshot")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise ValueError(f"{path}: not a readable memory snapshot ({e})") from e
    try:
        header = json.loads(meta["gma6"])
    except (KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a gma6 memory snapshot (no gma6 header)") from e
    if header.get("format") != STATE_FORMAT:
        raise ValueError(f"{path}: snapshot format {header.get('format')!r}, this gma6 reads {STATE_FORMAT!r}")
    missing = {"memory", "usage", "age", "tokens_read"} - set(tensors)
    if missing:
        raise ValueError(f"{path}: snapshot lacks tensors {sorted(missing)}")
    state = MemoryState(
        memory=tensors["memory"],
        usage=tensors["usage"],
        age=tensors["age"],
        tokens_read=tensors["tokens_read"],
        segments_read=int(header.get("segments_read", 0)),
    )
    return state, header.get("metadata", {})
