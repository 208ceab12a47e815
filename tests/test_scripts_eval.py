"""scripts/paired_eval.py: two adapters' answers on the same samples, their difference with its interval."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "paired_eval.py"


def _eval(path: Path, right: list[bool], seeds: list[int]) -> str:
    outputs = [{"system": "memory", "task": "qa1" if i % 2 else "qa2", "length": "4k", "seed": s, "correct": r}
               for i, (r, s) in enumerate(zip(right, seeds))]
    path.write_text(json.dumps({"rows": [], "outputs": outputs}))
    return str(path)


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True)


def test_the_paired_difference_and_its_interval(tmp_path):
    seeds = list(range(8))
    a = _eval(tmp_path / "a.json", [True, True, True, False, True, True, False, True], seeds)
    b = _eval(tmp_path / "b.json", [True, False, True, False, True, True, False, False], seeds)
    r = _run("--a", a, "--b", b, "--out", str(tmp_path / "d.json"))
    assert r.returncode == 0, r.stderr
    got = json.loads((tmp_path / "d.json").read_text())
    assert got["samples"] == 8 and got["a_mean"] == 75.0 and got["b_mean"] == 50.0
    assert got["a_minus_b_points"] == 25.0 and got["ci95_points"] > 0
    assert got["a_by_task"] == {"qa1": 75.0, "qa2": 75.0} and got["b_by_task"] == {"qa1": 25.0, "qa2": 75.0}


def test_different_samples_are_refused(tmp_path):
    a = _eval(tmp_path / "a.json", [True, False], [1, 2])
    b = _eval(tmp_path / "b.json", [True, False], [1, 3])
    r = _run("--a", a, "--b", b, "--out", str(tmp_path / "d.json"))
    assert r.returncode != 0 and "different samples" in r.stderr and not (tmp_path / "d.json").exists()
