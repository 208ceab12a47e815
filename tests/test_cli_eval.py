"""``gma6 eval`` end to end, in a subprocess, on a tiny Gemma 3 saved with a word-level tokenizer."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from gma6.data import DEFAULT_TEMPLATE, INSTRUCTIONS, TASKS, generate_samples

from conftest import tiny_gemma3

SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]  # ids 0-3: tiny_gemma3's pad, BOS, EOS
_WORD = re.compile(r"\w+|[^\w\s]+")  # what the Whitespace pre-tokenizer cuts


def _vocabulary() -> list[str]:
    """Words of the instructions, the template and bAbI stories; filler text becomes <unk>."""
    words: set[str] = set()
    for text in [*INSTRUCTIONS.values(), DEFAULT_TEMPLATE]:
        words |= set(_WORD.findall(text))
    for task in TASKS:
        for split in ("train", "test"):
            for s in generate_samples(task, 0, 40, split=split, seed=0):
                words |= set(_WORD.findall(" ".join(s.facts) + " " + s.question + " " + s.target))
    return SPECIALS + sorted(words)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-gemma3")
    vocab = {w: i for i, w in enumerate(_vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>")
    fast.save_pretrained(folder)
    tiny_gemma3(vocab=len(vocab)).save_pretrained(folder)
    return folder


def _gma6(*args: str, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", "from gma6.cli import main; main()", *args],
                          capture_output=True, text=True, env=env, cwd=cwd, timeout=600)


def test_eval_writes_results_and_plot(tiny_checkpoint, tmp_path):
    out = tmp_path / "results"
    p = _gma6("eval", "--model", str(tiny_checkpoint), "--tasks", "qa1", "--lengths", "0k,1k", "--samples", "2",
              "--limit", "2", "--segment-length", "64", "--out-dir", str(out), "--name", "smoke", "--no-progress")
    assert p.returncode == 0, p.stderr[-3000:]
    data = json.loads((out / "smoke.json").read_text())
    for key in ("model", "adapter", "device", "dtype", "date", "segment_length", "command", "rows"):
        assert key in data
    assert data["model"] == str(tiny_checkpoint) and data["adapter"] is None
    assert data["device"] == "cpu" and data["dtype"] == "float32" and data["segment_length"] == 64
    assert data["command"].startswith("gma6 eval --model")
    rows = {(r["system"], r["length"]): r for r in data["rows"]}
    assert set(rows) == {(s, x) for s in ("base_full", "base_last_segment") for x in ("0k", "1k")}
    # The tiny model has 1024 positions: a 1k prompt does not fit, so base_full is skipped there.
    full_1k = rows.pop(("base_full", "1k"))
    assert full_1k["accuracy"] is None and "1024" in full_1k["skipped"]
    for r in rows.values():
        assert r["task"] == "qa1" and r["n"] == 2 and 0 <= r["accuracy"] <= 1 and r["seconds"] >= 0
    assert rows[("base_last_segment", "1k")]["prompt_tokens"] <= 64
    assert (out / "smoke.png").read_bytes().startswith(b"\x89PNG")
    assert "memory: skipped" in p.stderr
    assert "base_full" in p.stdout and "wrote" in p.stdout


def test_eval_fresh_memory_and_per_length_samples(tiny_checkpoint, tmp_path):
    p = _gma6("eval", "--model", str(tiny_checkpoint), "--tasks", "qa2,qa5", "--lengths", "0k,200",
              "--samples", "2,1", "--segment-length", "48", "--systems", "base_question,memory", "--fresh-memory",
              "--out-dir", str(tmp_path), "--name", "fresh", "--no-plot", "--no-progress")
    assert p.returncode == 0, p.stderr[-3000:]
    data = json.loads((tmp_path / "fresh.json").read_text())
    assert not (tmp_path / "fresh.png").exists()
    assert data["adapter"] == "fresh" and data["samples"] == {"0k": 2, "200": 1}
    by = {}
    for o in data["outputs"]:
        by.setdefault(o["system"], {})[(o["task"], o["length"], o["index"])] = o["output"]
    assert by["base_question"] == by["memory-fresh"]  # a fresh memory changes nothing


@pytest.mark.parametrize("args, needle", [
    (["--tasks", "qa1,qa9"], "qa9"),
    (["--lengths", "0k,lots"], "lots"),
    (["--systems", "oracle"], "oracle"),
    (["--lengths", "0k,1k", "--samples", "2,3,4"], "--samples"),
    (["--adapter", "/nonexistent/adapter"], "/nonexistent/adapter"),
    (["--question-reads", "-1"], "--question-reads"),
    (["--samples", "0"], "--samples '0': expected positive counts"),
    (["--lengths", "0k,1k", "--samples", "2,-1"], "--samples '2,-1'"),
])
def test_bad_arguments_exit_non_zero_naming_them(tiny_checkpoint, tmp_path, args, needle):
    p = _gma6("eval", "--model", str(tiny_checkpoint), "--lengths", "0k", "--samples", "1", "--no-progress",
              "--out-dir", str(tmp_path), *args)
    assert p.returncode != 0
    assert needle in p.stderr
    assert not list(tmp_path.iterdir())
