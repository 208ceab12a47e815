"""Memory snapshots: "read once, ask later".

A snapshot is a ``MemoryState`` written by :func:`gma6.save_state` (safetensors, atomic) whose
JSON metadata says which model and which memory adapter produced it, so that loading it into
anything else is refused instead of silently giving nonsense:

``snapshot_version``  format of this header (:data:`SNAPSHOT_VERSION`)
``model``             the base: ``{"name", "model_type", "hidden_size", "num_hidden_layers"}``
``adapter_hash``      sha256 of the memory's weights (:func:`adapter_hash`)
``config``            the memory's ``GMA6Config`` as a dict
``tokens_read``       real tokens read into the memory
``tokenizer``         the tokenizer's name (informative)
``gma6_version``      the gma6 that wrote it
``checksum``          sha256 of the state tensors (:func:`state_checksum`)
``record``            optional per-segment instrumentation written by ``gma6 read --record``
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .state import MemoryState, load_state_with_metadata, save_state

SNAPSHOT_VERSION = 1


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().to("cpu").contiguous().reshape(-1)  # 1-D: a 0-dim tensor cannot be viewed as bytes
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def adapter_hash(model: nn.Module) -> str:
    """sha256 of the memory's weights (names, shapes, values as float32), in sorted key order.

    The same adapter loaded in float32 or bfloat16 memory hashes the same only if its values do;
    the hash identifies weights, not files.
    """
    controller = getattr(model, "controller", None)
    if controller is None:
        raise TypeError(f"{type(model).__name__} has no memory attached (no .controller)")
    h = hashlib.sha256()
    for name, t in sorted(controller.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(_tensor_bytes(t.float() if t.is_floating_point() else t))
    return h.hexdigest()


def state_checksum(state: MemoryState) -> str:
    """sha256 of a state's tensors (memory, usage, age, tokens_read) and segment count."""
    h = hashlib.sha256()
    for name in ("memory", "usage", "age", "tokens_read"):
        t = getattr(state, name)
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(_tensor_bytes(t))
    h.update(str(int(state.segments_read)).encode())
    return h.hexdigest()


def model_id(model: nn.Module, name: str | None = None) -> dict[str, Any]:
    """What identifies the base: its name (``_name_or_path`` unless ``name``), type and sizes."""
    from .integration import text_config

    base = getattr(model, "base", model)
    tc = text_config(base)
    if name is None:
        name = str(getattr(base.config, "_name_or_path", "") or getattr(tc, "_name_or_path", ""))
    return {
        "name": name,
        "model_type": str(getattr(tc, "model_type", "unknown")),
        "hidden_size": int(getattr(tc, "hidden_size", 0)),
        "num_hidden_layers": int(getattr(tc, "num_hidden_layers", 0)),
    }


def save_snapshot(
    path: str | os.PathLike,
    state: MemoryState,
    model: nn.Module,
    tokenizer_name: str | None = None,
    tokens_read: int | None = None,
    model_name: str | None = None,
    record: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``state`` with a header naming ``model`` and its adapter (atomically).

    Args:
        tokens_read: defaults to the state's own count (sum over the batch).
        model_name: overrides the base's ``_name_or_path`` in the header (e.g. a stable name
            for the embedded default, whose cache path differs between machines).
        record: instrumentation gathered while reading (kept in the JSON header; keep it small).
    """
    from . import __version__

    if not isinstance(state, MemoryState):
        raise TypeError(f"state must be a MemoryState, got {type(state).__name__}")
    state = state.to("cpu")
    if tokens_read is None:
        tokens_read = int(state.tokens_read.sum())
    meta: dict[str, Any] = {
        "snapshot_version": SNAPSHOT_VERSION,
        "model": model_id(model, model_name),
        "adapter_hash": adapter_hash(model),
        "config": model.config.to_dict(),
        "tokens_read": int(tokens_read),
        "tokenizer": tokenizer_name,
        "gma6_version": __version__,
        "checksum": state_checksum(state),
    }
    if record is not None:
        meta["record"] = record
    if extra:
        meta.update({k: v for k, v in extra.items() if k not in meta})
    return save_state(state, path, metadata=meta)


def read_snapshot(path: str | os.PathLike) -> tuple[MemoryState, dict[str, Any]]:
    """Read a snapshot and its header, checking its version and checksum (no model needed).

    Raises:
        FileNotFoundError: no such file.
        ValueError: damaged or truncated file, not a snapshot, unsupported version, checksum mismatch.
    """
    path = Path(path)
    try:
        state, meta = load_state_with_metadata(path)
    except ValueError as e:
        raise ValueError(f"{path}: damaged, truncated or not a gma6 memory snapshot ({e})") from e
    version = meta.get("snapshot_version")
    if version is None:
        raise ValueError(f"{path}: a memory state without a snapshot header (was it written by gma6.save_state?)")
    if version != SNAPSHOT_VERSION:
        raise ValueError(f"{path}: snapshot version {version!r} is not supported; this gma6 reads version {SNAPSHOT_VERSION}")
    expected = meta.get("checksum")
    if expected != state_checksum(state):
        raise ValueError(f"{path}: checksum mismatch: the snapshot's tensors were changed or damaged")
    return state, meta


def check_snapshot(meta: dict[str, Any], model: nn.Module, path: str | os.PathLike = "snapshot",
                   model_name: str | None = None) -> None:
    """Raise ``ValueError`` unless the header ``meta`` was made by ``model`` and its adapter."""
    want = meta.get("model", {})
    have = model_id(model, model_name)
    if want != have:
        diff = {k: (want.get(k), have.get(k)) for k in set(want) | set(have) if want.get(k) != have.get(k)}
        raise ValueError(
            f"{path}: made for another model ({', '.join(f'{k}: snapshot {a!r}, loaded {b!r}' for k, (a, b) in sorted(diff.items()))})"
        )
    if meta.get("adapter_hash") != adapter_hash(model):
        raise ValueError(
            f"{path}: made with another memory adapter (adapter hash {str(meta.get('adapter_hash'))[:12]}..., "
            f"the loaded memory's is {adapter_hash(model)[:12]}...); load the adapter it was read with"
        )


def load_snapshot(path: str | os.PathLike, model: nn.Module, model_name: str | None = None,
                  with_metadata: bool = False) -> MemoryState | tuple[MemoryState, dict[str, Any]]:
    """Read a snapshot made by ``save_snapshot`` for ``model`` (same base, same adapter).

    Raises:
        ValueError: naming the problem: another model, another adapter, damaged or truncated
            file, checksum mismatch, unsupported snapshot version, or a state of another shape.
    """
    state, meta = read_snapshot(path)
    check_snapshot(meta, model, path, model_name)
    controller = getattr(model, "controller", None)
    shape = getattr(controller, "shape", None)
    if shape is not None:
        try:
            state.check(tuple(shape))
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e
    return (state, meta) if with_metadata else state
