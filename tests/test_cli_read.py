"""``gma6 read / ask / inspect / chat`` end to end, in subprocesses, on a tiny Gemma 3 saved to disk."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from test_cli_eval import _gma6, tiny_checkpoint  # noqa: F401  (a fixture: the tiny model + tokenizer folder)

TEXT = ("Mary went to the kitchen . John moved to the garden . Sandra journeyed to the office . " * 6).strip()


@pytest.fixture(scope="module")
def notes(tiny_checkpoint, tmp_path_factory):  # noqa: F811
    d = tmp_path_factory.mktemp("notes")
    (d / "doc.txt").write_text(TEXT)
    p = _gma6("read", str(d / "doc.txt"), "--model", str(tiny_checkpoint), "--segment-length", "16",
              "--out", str(d / "notes.gma6"), "--no-progress")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "tokens/s" in p.stdout and "segments of 16" in p.stdout
    return d / "notes.gma6"


def test_ask_answers_as_reading_and_asking_in_one_process(tiny_checkpoint, notes):  # noqa: F811
    from gma6.cli.read import answer, document_ids, load_memory

    p = _gma6("ask", str(notes), "Where is Mary ?", "--model", str(tiny_checkpoint), "--max-new-tokens", "6")
    assert p.returncode == 0, p.stderr[-3000:]
    mm, tok, _, _ = load_memory(str(tiny_checkpoint), None, "cpu", "float32")
    state = mm.read(torch.tensor([document_ids(tok, TEXT)]), segment_length=16, bos_token_id=tok.bos_token_id)
    expected = answer(mm, tok, state, "Where is Mary ?", 6)
    assert p.stdout.strip().splitlines()[-1:] == ([expected] if expected else [])


def test_ask_refuses_another_adapter_and_damaged_files(tiny_checkpoint, notes, tmp_path):  # noqa: F811
    from gma6 import GMA6Config, attach_memory, load_base

    base, _ = load_base(str(tiny_checkpoint))
    torch.manual_seed(1)
    attach_memory(base, GMA6Config()).save_pretrained(tmp_path / "other")
    p = _gma6("ask", str(notes), "Where is Mary ?", "--model", str(tiny_checkpoint), "--adapter", str(tmp_path / "other"))
    assert p.returncode == 2 and "another memory adapter" in p.stderr
    cut = tmp_path / "cut.gma6"
    cut.write_bytes(notes.read_bytes()[:-64])
    p = _gma6("ask", str(cut), "Where is Mary ?", "--model", str(tiny_checkpoint))
    assert p.returncode == 2 and "truncated" in p.stderr


def test_inspect_prints_a_summary_and_writes_pngs(notes, tmp_path):
    p = _gma6("inspect", str(notes), "--out-dir", str(tmp_path / "fig"))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "tokens read:" in p.stdout and "segments: " in p.stdout and "mean usage" in p.stdout
    assert " <- " in p.stdout  # which tokens each slot was written from
    for name in ("usage.png", "slots.png", "gates.png"):
        data = (tmp_path / "fig" / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 1000


def test_chat_commands(tiny_checkpoint, notes, tmp_path):  # noqa: F811
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    saved = tmp_path / "chat.gma6"
    turns = f"Mary went to the kitchen .\n/stats\n/save {saved}\n/bogus\n/reset\n/stats\n/quit\nJohn went to the garden .\n"
    p = subprocess.run([sys.executable, "-c", "from gma6.cli import main; main()", "chat", "--model",
                        str(tiny_checkpoint), "--memory", str(notes), "--max-new-tokens", "4"],
                       input=turns, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    out = p.stdout
    assert out.count("gma6:") == 1  # /quit stops before the last turn
    stats = [line for line in out.splitlines() if line.startswith("tokens read:")]
    assert len(stats) == 2 and stats[1].startswith("tokens read: 0  segments: 0")
    assert int(stats[0].split()[2]) > len(TEXT.split())  # the snapshot's tokens plus the turn's
    assert "memory reset" in out and "unknown command /bogus" in out and f"saved {saved}" in out
    p = _gma6("inspect", str(saved), "--no-plots")
    assert p.returncode == 0 and "no per-segment record" in p.stdout
