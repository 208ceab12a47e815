"""benchmarks/train_saved_bytes.py on a tiny Gemma 3 (a subprocess, as it is run): with and without the base's
gradient checkpointing, against the frozen floor."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from gma6 import GMA6Config, attach_memory, load_base

from test_cli_eval import tiny_checkpoint  # noqa: F401  (module-scoped fixture)

ROOT = Path(__file__).resolve().parents[1]


def test_saved_bytes_with_and_without_checkpointing(tiny_checkpoint, tmp_path):  # noqa: F811
    base, _ = load_base(str(tiny_checkpoint), progress=False)
    torch.manual_seed(0)
    mm = attach_memory(base, GMA6Config(num_slots=8, memory_dim=None, num_heads=2, layers=[0, 1], write_rule="tokens",
                                        tokens_per_segment=4, read_rule="base", token_retention="priority",
                                        read_site="attention", read_rank=2))
    mm.save_pretrained(tmp_path / "adapter")
    mm.detach()
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
