"""scripts/grow_read_rank.py: a saved adapter's read adapters grown to a higher rank compute the same function."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import perturb, tiny_gemma3

import gma6
from gma6 import GMA6Config
from gma6.model import attach_memory

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _config(**kw) -> GMA6Config:
    args = dict(num_slots=6, memory_dim=None, layers=[0, 1, 2], write_rule="tokens", tokens_per_segment=3,
                read_rule="base", token_retention="priority", usage_decay=0.99, read_site="attention", read_rank=2)
    args.update(kw)
    return GMA6Config(**args)


@pytest.mark.parametrize("query", ["before_norm", "after_norm"])
def test_a_grown_read_rank_reads_the_same_and_trains_its_new_columns(tmp_path, query):
    base = tiny_gemma3(layers=4).float()
    mm = attach_memory(base, _config(read_query=query))
    perturb(mm)
    ids = torch.randint(3, 64, (2, 14), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = mm(input_ids=ids[:, 8:], memory_state=mm(input_ids=ids[:, :8]).memory_state).logits
    mm.save_pretrained(tmp_path / "a")
    mm.detach()
    subprocess.run([sys.executable, str(SCRIPTS / "grow_read_rank.py"), "--adapter", str(tmp_path / "a"), "--rank", "5",
                    "--out", str(tmp_path / "b")], check=True)
    grown = gma6.load_adapter(base, tmp_path / "b")
    assert grown.config.read_rank == 5 and grown.config.read_query == query
    assert grown.controller.layers[0].read_q.down.weight.shape[0] == 5
    state = grown(input_ids=ids[:, :8]).memory_state
    got = grown(input_ids=ids[:, 8:], memory_state=state)
    assert torch.allclose(got.logits, want, atol=1e-5)
    got.logits.square().mean().backward()
    up = grown.controller.layers[0].read_q.up.weight.grad
    assert up[:, 2:].abs().sum() > 0  # the new (zero) columns get gradients


def test_growing_to_a_rank_not_above_the_adapters_is_refused(tmp_path):
    mm = attach_memory(tiny_gemma3(layers=4), _config())
    mm.save_pretrained(tmp_path / "a")
    r = subprocess.run([sys.executable, str(SCRIPTS / "grow_read_rank.py"), "--adapter", str(tmp_path / "a"), "--rank", "2",
                        "--out", str(tmp_path / "b")], capture_output=True, text=True)
    assert r.returncode != 0 and "--rank must be larger" in r.stderr and not (tmp_path / "b").exists()
