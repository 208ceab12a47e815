"""Snapshots of a memory: saved with the model and adapter they belong to, refused elsewhere."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from gma6 import GMA6Config, attach_memory
from gma6.snapshot import SNAPSHOT_VERSION, adapter_hash, load_snapshot, read_snapshot, save_snapshot

from conftest import tiny_gemma3

CFG = dict(num_slots=4, memory_dim=16, num_heads=2, num_memory_layers=2)


def _memory(seed: int = 0, model_seed: int = 0, name: str = "tiny-a"):
    base = tiny_gemma3(seed=model_seed)
    base.config._name_or_path = name
    torch.manual_seed(seed)
    return attach_memory(base, GMA6Config(**CFG))


@pytest.fixture
def snap(tmp_path):
    mm = _memory()
    ids = torch.randint(3, 64, (1, 40))  # 3 segments of BOS + 15 tokens: 43 tokens written
    state = mm.read(ids, segment_length=16, bos_token_id=1)
    path = save_snapshot(tmp_path / "notes.gma6", state, mm, tokenizer_name="words")
    return mm, state, path


def test_round_trip_keeps_the_state_and_header(snap):
    mm, state, path = snap
    loaded, meta = load_snapshot(path, mm, with_metadata=True)
    for k in ("memory", "usage", "age", "tokens_read"):
        assert torch.equal(getattr(loaded, k), getattr(state, k))
    assert loaded.segments_read == state.segments_read == 3
    assert meta["tokens_read"] == int(state.tokens_read.sum()) == 43 and meta["snapshot_version"] == SNAPSHOT_VERSION
    assert meta["adapter_hash"] == adapter_hash(mm) and meta["config"]["num_slots"] == 4
    assert meta["model"]["name"] == "tiny-a" and meta["tokenizer"] == "words"
    assert not list(path.parent.glob("*.tmp*"))


def test_refuses_another_model(snap):
    _, _, path = snap
    with pytest.raises(ValueError, match="another model"):
        load_snapshot(path, _memory(name="tiny-b"))


def test_refuses_another_adapter(snap):
    _, _, path = snap
    with pytest.raises(ValueError, match="another memory adapter"):
        load_snapshot(path, _memory(seed=1))


def test_refuses_truncated_file(snap):
    mm, _, path = snap
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match="truncated"):
        load_snapshot(path, mm)


def _rewrite_header(path, edit):
    """Change the JSON header of a safetensors file in place (keeping tensors as they are)."""
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    gma6 = json.loads(header["__metadata__"]["gma6"])
    edit(gma6)
    header["__metadata__"]["gma6"] = json.dumps(gma6)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


def test_refuses_unsupported_version(snap):
    mm, _, path = snap
    _rewrite_header(path, lambda h: h["metadata"].update(snapshot_version=99))
    with pytest.raises(ValueError, match="version 99 is not supported"):
        load_snapshot(path, mm)


def test_refuses_checksum_mismatch(snap):
    mm, _, path = snap
    _rewrite_header(path, lambda h: h["metadata"].update(checksum="0" * 64))
    with pytest.raises(ValueError, match="checksum mismatch"):
        read_snapshot(path)


def test_refuses_a_plain_state(tmp_path, snap):
    from gma6.state import save_state

    mm, state, _ = snap
    p = save_state(state, tmp_path / "plain.gma6")
    with pytest.raises(ValueError, match="without a snapshot header"):
        load_snapshot(p, mm)


def test_a_base_read_memory_snapshots_and_its_scalar_sink_is_hashed(tmp_path):
    """read_rule='base' has a 0-dim parameter (the sink): the adapter hash must take it, and change with it."""
    base = tiny_gemma3()
    base.config._name_or_path = "tiny-a"
    mm = attach_memory(base, GMA6Config(num_slots=6, memory_dim=None, layers=[0, 2], write_rule="tokens",
                                        tokens_per_segment=3, read_rule="base"))
    state = mm.read(torch.randint(3, 64, (1, 30)), segment_length=16, bos_token_id=1)
    path = save_snapshot(tmp_path / "notes.gma6", state, mm, tokenizer_name="words")
    loaded = load_snapshot(path, mm)
    assert torch.equal(loaded.memory, state.memory) and torch.equal(loaded.usage, state.usage)
    before = adapter_hash(mm)
    with torch.no_grad():
        mm.controller.layers[0].sink.add_(1.0)
    assert adapter_hash(mm) != before
