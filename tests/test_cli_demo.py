"""`gma6 demo` end to end on a tiny Gemma 3 saved to disk (offline tokenizer), as a subprocess."""

from __future__ import annotations

import re

from test_cli_eval import _gma6, tiny_checkpoint  # noqa: F401  (fixture)


def test_demo_runs_end_to_end_with_a_fresh_memory(tiny_checkpoint):  # noqa: F811
    p = _gma6("demo", "--model", str(tiny_checkpoint), "--fresh", "--samples", "2", "--length", "300",
              "--segment-length", "64", "--device", "cpu")
    assert p.returncode == 0, p.stderr[-3000:]
    out = p.stdout
    assert "memory: fresh (untrained)" in out and "trainable params:" in out
    assert len(re.findall(r"question: Where is", out)) == 2
    assert re.search(r"free answer, BABILong scorer:\s+bare \d/2\s+memory \d/2", out)
    assert re.search(r"likeliest of 6 choices:\s+bare \d/2\s+memory \d/2", out)
    assert "layer" in out and "forget gate" in out  # what the memory holds


def test_demo_rejects_bad_arguments(tiny_checkpoint):  # noqa: F811
    p = _gma6("demo", "--model", str(tiny_checkpoint), "--length", "lots")
    assert p.returncode != 0 and "lots" in (p.stderr + p.stdout)
    p = _gma6("demo", "--model", str(tiny_checkpoint), "--samples", "0")
    assert p.returncode != 0 and "samples" in (p.stderr + p.stdout)
