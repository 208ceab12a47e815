"""benchmarks/train_saved_bytes.py on a tiny Gemma 3 (a subprocess, as it is run): with and without the base's
gradient checkpointing, against the frozen floor."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gma6 import GMA6Config, attach_memory, load_base

from test_cli_eval import tiny_checkpoint  # noqa: F401  (module-scoped fixture)

ROOT = Path(__file__).resolve().parents[1]


def _save_adapter(checkpoint: Path, directory: Path) -> None:
    """A fresh memory of the default's kind (two layers) for the tiny checkpoint, saved in ``directory``."""
    base, _ = load_base(str(checkpoint), progress=False)
    torch.manual_seed(0)
    mm = attach_memory(base, GMA6Config(num_slots=8, memory_dim=None, num_heads=2, layers=[0, 1], write_rule="tokens",
                                        tokens_per_segment=4, read_rule="base", token_retention="priority",
                                        read_site="attention", read_rank=2))
    mm.save_pretrained(directory)
    mm.detach()


def test_saved_bytes_with_and_without_checkpointing(tiny_checkpoint, tmp_path):  # noqa: F811
    _save_adapter(tiny_checkpoint, tmp_path / "adapter")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "benchmarks")}
    got = {}
    for ckpt in (False, True):
        out = tmp_path / f"saved-{ckpt}.json"
        r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_saved_bytes.py"), "--model",
                            str(tiny_checkpoint), "--adapter", str(tmp_path / "adapter"), "--dtype", "float32",
                            "--batch", "2", "--context", "64", "--segment", "32", "--positions", "4", "--out", str(out),
                            *(["--checkpointing"] if ckpt else [])], capture_output=True, text=True, env=env,
                           timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        got[ckpt] = json.loads(out.read_text())
        assert got[ckpt]["checkpointing"] is ckpt and got[ckpt]["positions"] == 4
    for kind in ("train_memory", "train_frozen"):
        assert 0 < got[True]["saved_mib"][kind] < got[False]["saved_mib"][kind], kind  # recomputed, so less kept
    assert got[True]["train_memory_over_train_frozen"] > 1  # the memory's state and write are kept besides


def _benchmark(name: str):
    """The script ``benchmarks/<name>.py`` imported as a module (the scripts import each other by bare name)."""
    import importlib

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def test_host_overhead_times_the_default_kind_on_the_270m_stack(tmp_path):
    """benchmarks/host_overhead.py: the shipped adapter's kind on an 18-layer tiny stack, base and memory timed,
    the memory's heaviest functions listed, the JSON written."""
    ho = _benchmark("host_overhead")
    kind = ho.kind_of(ROOT / "src" / "gma6" / "adapters" / "gemma3-270m-babilong-memory-alone")
    assert kind.read_rule == "base" and kind.read_rank == 8 and len(kind.layers) == 17
    out = tmp_path / "host.json"
    got = ho.main(["--tokens", "4", "--segments", "2", "--repeats", "2", "--profile", "3", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["ratio"] == got["ratio"]
    ms = {r["system"]: r["ms_per_segment"] for r in saved["rows"]}
    assert set(ms) == {"base_segments", "memory"} and all(v > 0 for v in ms.values())
    assert abs(saved["ratio"] - ms["memory"] / ms["base_segments"]) < 1e-2
    assert 0 < len(saved["profile"]) <= 3 and all(p["calls"] > 0 for p in saved["profile"])


def test_host_overhead_refuses_a_non_positive_count():
    ho = _benchmark("host_overhead")
    with pytest.raises(SystemExit, match="must be positive"):
        ho.main(["--segments", "0"])


def test_segment_parts_times_each_part_of_a_segment(tiny_checkpoint, tmp_path):  # noqa: F811
    """benchmarks/segment_parts.py: every part of a segment timed (the write and the slots' preparation alone too),
    host never after wall; a bad count is refused."""
    _save_adapter(tiny_checkpoint, tmp_path / "adapter")
    segment_parts = _benchmark("segment_parts")
    out = tmp_path / "parts.json"
    got = segment_parts.main(["--model", str(tiny_checkpoint), "--adapter", str(tmp_path / "adapter"), "--batch", "2",
                              "--tokens", "16", "--repeats", "2", "--out", str(out)])
    assert json.loads(out.read_text()) == got
    parts = got["parts"]
    assert set(parts) == {"base", "memory_read", "memory_read_write", "write_alone", "slots_prepared_alone"}
    assert all(0 < p["host_ms"] <= p["wall_ms"] for p in parts.values())
    with pytest.raises(SystemExit):
        segment_parts.main(["--model", str(tiny_checkpoint), "--adapter", str(tmp_path / "adapter"), "--repeats", "0"])


def test_train_steps_layers_parse_ranges_and_refuse_bad_text():
    ts = _benchmark("train_steps")
    assert ts.parse_layers("12-16") == [12, 13, 14, 15, 16]
    assert ts.parse_layers("3, 0-1,3") == [0, 1, 3]
    for bad, why in (("", "no layer"), ("a", "not a layer index"), ("5-2", "empty"), ("1-x", "not a layer index")):
        with pytest.raises(ValueError, match=why):
            ts.parse_layers(bad)


def test_train_steps_layers_attach_a_fresh_memory_of_the_adapters_kind(tiny_checkpoint, tmp_path):  # noqa: F811
    """``--layers``: the adapter's kind (every other field of its config) at other layers, its weights seeded, so
    that the step's cost can be timed against where the memory starts (``train_graphed.py``)."""
    import argparse

    ts = _benchmark("train_steps")
    _save_adapter(tiny_checkpoint, tmp_path / "adapter")
    saved = GMA6Config.load(tmp_path / "adapter")

    def steps(*extra: str):
        ap = argparse.ArgumentParser()
        ts.add_arguments(ap, batch=2, context=64, positions=4, device="cpu")
        return ts.TrainSteps(ap.parse_args(["--model", str(tiny_checkpoint), "--adapter", str(tmp_path / "adapter"),
                                            "--dtype", "float32", "--segment", "32", *extra]))

    own = steps()
    per_layer = sum(p.numel() for p in own.mm.memory_parameters()) / len(saved.layers)
    moved, again = steps("--layers", "1-2"), steps("--layers", "1-2")
    assert own.header()["layers"] == [0, 1] and moved.header()["layers"] == [1, 2]
    assert {**moved.mm.config.to_dict(), "layers": None} == {**saved.to_dict(), "layers": None}
    assert sum(p.numel() for p in moved.mm.memory_parameters()) == per_layer * 2
    for a, b in zip(moved.mm.memory_parameters(), again.mm.memory_parameters()):
        assert torch.equal(a, b)  # seeded
    loss = moved.memory_loss()
    loss.backward()
    assert torch.isfinite(loss) and any(p.grad is not None for p in moved.mm.memory_parameters())
    assert steps("--layers", "2").mm.config.layers == [2]


def test_train_contexts_keeps_each_systems_fastest_step_and_plots(tmp_path):
    """benchmarks/train_contexts.py: the training rows of several bench files by context (a rerun's faster step
    kept with its own peak), memory-only's ratios against both full fine-tunes, JSON and PNG; no rows is an error."""
    tc = _benchmark("train_contexts")

    def bench(name, ctx, mem_s, whole_s, status="ok"):
        rows = [{"system": "train_memory", "context": ctx, "seconds": mem_s, "peak_mem_gib": 2.0, "status": "ok"},
                {"system": "train_full", "context": ctx, "seconds": 1.0, "peak_mem_gib": 4.0, "status": "ok"},
                {"system": "train_full_context", "context": ctx, "seconds": whole_s, "peak_mem_gib": 8.0,
                 "status": status},
                {"system": "memory", "context": ctx, "seconds": 0.1, "peak_mem_gib": 1.0, "status": "ok"}]
        path = tmp_path / name
        path.write_text(json.dumps({"device_name": "cpu", "rows": rows}))
        return path

    files = [bench("a.json", 4096, 2.0, 1.0), bench("b.json", 32768, 4.0, 9.0), bench("c.json", 32768, 3.0, 12.0),
             bench("d.json", 65536, 5.0, None, status="skipped: context beyond the base's window (32768 tokens)")]
    got = tc.main([*map(str, files), "--out", str(tmp_path / "out")])
    assert json.loads((tmp_path / "out.json").read_text()) == got
    assert (tmp_path / "out.png").read_bytes()[:4] == b"\x89PNG"
    assert [r["context"] for r in got["rows"]] == [4096, 32768, 65536]
    assert got["rows"][1]["train_memory_s"] == 3.0 and got["rows"][1]["train_full_context_s"] == 9.0
    assert "train_full_context_s" not in got["rows"][2]  # skipped there
    ratios = {(r["context"], r["against"]): r for r in got["ratios"]}
    assert ratios[(32768, "train_full_context")] == {"context": 32768, "against": "train_full_context", "faster": 3.0,
                                                     "leaner": 4.0}
    assert ratios[(4096, "train_full")]["faster"] == 0.5 and (65536, "train_full_context") not in ratios
    assert got["machines"] == ["cpu"] and "train_contexts.py" in got["command"]
    empty = bench("e.json", 1024, 1.0, 1.0, status="oom")
    empty.write_text(json.dumps({"rows": []}))
    with pytest.raises(ValueError, match="no training rows"):
        tc.main([str(empty), "--out", str(tmp_path / "none")])
