"""load_base: clear errors for what cannot be loaded; local checkpoints load offline."""

from __future__ import annotations

import sys

import pytest
import torch

import gma6
from gma6.base import default_adapter

from conftest import tiny_gemma3


def test_missing_paths_and_bad_options(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        gma6.load_base(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no such GGUF file"):
        gma6.load_base(str(tmp_path / "missing.gguf"))
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        gma6.load_base(str(tmp_path), dtype="float8")


def test_4bit_without_bitsandbytes_is_refused(tmp_path, monkeypatch):
    tiny_gemma3().save_pretrained(tmp_path)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if it were not installed
    with pytest.raises(ImportError, match="needs bitsandbytes"):
        gma6.load_base(str(tmp_path), load_in_4bit=True)


def test_shipped_adapter_is_there():
    names = sorted(p.name for p in default_adapter().iterdir())
    assert {"gma6_config.json", "memory_adapter.safetensors", "training.json"} <= set(names)
    cfg = gma6.GMA6Config.load(default_adapter())
    assert cfg.model_type == "gemma3_text" and cfg.hidden_size == 640
    assert cfg.lora_rank == 0 and not (default_adapter() / "lora_adapter.safetensors").exists()  # the memory alone
    assert (default_adapter() / "memory_adapter.safetensors").stat().st_size < 16 * 2**20
