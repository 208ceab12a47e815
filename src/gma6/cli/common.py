"""Helpers shared by the subcommands: device choice, loading the base, parsing lists."""

from __future__ import annotations

import shlex
import sys
from typing import Any

import torch
import typer


def pick_device(device: str | None) -> torch.device:
    """``auto``/None: CUDA if available, else CPU; anything else as torch spells it."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as e:
        raise typer.BadParameter(f"unknown device {device!r}") from e


def pick_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    """``auto``/None: bf16 on CUDA (the frozen base), fp32 on CPU."""
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    from ..base import resolve_dtype

    try:
        return resolve_dtype(dtype)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e


def load(model: str | None, device: torch.device, dtype: torch.dtype) -> tuple[Any, Any]:
    from ..base import load_base

    return load_base(model, dtype=dtype, device=device)


def split_list(value: str, cast: Any = str) -> list[Any]:
    try:
        return [cast(v.strip()) for v in value.split(",") if v.strip()]
    except ValueError as e:
        raise typer.BadParameter(f"{value!r}: {e}") from e


def command_line() -> str:
    return "gma6 " + " ".join(shlex.quote(a) for a in sys.argv[1:])
