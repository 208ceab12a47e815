"""scripts/grow_read_rank.py, drop_read_query.py and convert_read_query.py: saved adapters made into others."""

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


def test_the_after_norm_fit_reproduces_a_small_before_norm_change():
    """convert_read_query's fit: for a small change before the q-norm (where the norm is nearly linear), the
    after-norm adapter it fits reads nearly as the old one did."""
    sys.path.insert(0, str(SCRIPTS))
    from convert_read_query import fit_after_norm

    torch.manual_seed(0)
    base = tiny_gemma3(layers=4).float()
    before = attach_memory(base, _config())
    perturb(before)
    with torch.no_grad():
        for m in before.controller.layers:
            m.read_q.up.weight.mul_(0.05)
    x = torch.randn(512, base.config.hidden_size)
    ids = torch.randint(3, 64, (2, 14), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        state = before(input_ids=ids[:, :8]).memory_state
        want = before(input_ids=ids[:, 8:], memory_state=state, write=False).logits
        ups = [fit_after_norm(r, m.read_q, x) for r, m in zip(before._base_reads, before.controller.layers)]
        weights = before.controller.state_dict()
    before.detach()
    assert all(e > 0.8 for _, e in ups)  # the norm's Jacobian also projects out q's own direction, which a fixed map cannot
    after = attach_memory(base, _config(read_query="after_norm"))
    after.controller.load_state_dict(weights)
    with torch.no_grad():
        for (up, _), m in zip(ups, after.controller.layers):
            m.read_q.up.weight.copy_(up)
        got = after(input_ids=ids[:, 8:], memory_state=state, write=False).logits
        for m in after.controller.layers:
            m.read_q.up.weight.zero_()
        plain = after(input_ids=ids[:, 8:], memory_state=state, write=False).logits
    # nearer the old adapter's logits than with no query change at all
    assert (got - want).abs().mean() < 0.5 * (plain - want).abs().mean()


def test_persistent_slots_added_to_a_saved_adapter(tmp_path):
    base = tiny_gemma3(layers=4).float()
    mm = attach_memory(base, _config())
    perturb(mm)
    mm.save_pretrained(tmp_path / "a")
    mm.detach()
    subprocess.run([sys.executable, str(SCRIPTS / "grow_read_rank.py"), "--adapter", str(tmp_path / "a"),
                    "--persistent-slots", "4", "--out", str(tmp_path / "b")], check=True)
    grown = gma6.load_adapter(base, tmp_path / "b")
    assert grown.config.persistent_slots == 4 and grown.config.read_rank == 2
    assert grown.controller.persistent.shape[1] == 4 and grown.controller.persistent_logit[0].item() == -4.0
    r = subprocess.run([sys.executable, str(SCRIPTS / "grow_read_rank.py"), "--adapter", str(tmp_path / "b"),
                        "--persistent-slots", "4", "--out", str(tmp_path / "c")], capture_output=True, text=True)
    assert r.returncode != 0 and "persistent_slots=4" in r.stderr


def test_compare_adapters_says_how_far_apart_two_saved_adapters_are(tmp_path):
    base = tiny_gemma3(layers=4).float()
    mm = attach_memory(base, _config())
    perturb(mm)
    mm.save_pretrained(tmp_path / "a")
    mm.save_pretrained(tmp_path / "same")
    with torch.no_grad():
        mm.controller.layers[1].read_q.up.weight.add_(0.5)
    mm.save_pretrained(tmp_path / "moved")
    mm.detach()

    def run(b, *extra):
        return subprocess.run([sys.executable, str(SCRIPTS / "compare_adapters.py"), "--a", str(tmp_path / "a"),
                               "--b", str(b), "--out", str(tmp_path / "c.json"), *extra], capture_output=True, text=True)

    r = run(tmp_path / "same")
    assert r.returncode == 0, r.stderr
    import json

    got = json.loads((tmp_path / "c.json").read_text())
    assert got["within"] and got["max_relative_difference"] == 0.0 and got["tensors"] > 4
    r = run(tmp_path / "moved")
    got = json.loads((tmp_path / "c.json").read_text())
    assert r.returncode == 1 and not got["within"] and "layers.1.read_q.up" in got["worst"]
    assert got["by_tensor"][got["worst"]] > 0.01 and sum(v > 0 for v in got["by_tensor"].values()) == 1
    other = attach_memory(base, _config(num_slots=7))
    other.save_pretrained(tmp_path / "other")
    other.detach()
    r = run(tmp_path / "other")
    assert r.returncode == 2 and "different configs" in r.stderr


def test_drop_read_query_keeps_everything_but_the_query_adapter(tmp_path):
    """scripts/drop_read_query.py: the same adapter with read_query="none" (its key and value adapters and the rest
    kept), which reads as the original with its query adapters zeroed; an adapter without one is refused."""
    base = tiny_gemma3(layers=4).float()
    mm = attach_memory(base, _config())
    perturb(mm)
    ids = torch.randint(3, 64, (2, 14), generator=torch.Generator().manual_seed(2))
    mm.save_pretrained(tmp_path / "a")
    with torch.no_grad():
        for layer in mm.controller.layers:
            layer.read_q.up.weight.zero_()
        want = mm(input_ids=ids[:, 8:], memory_state=mm(input_ids=ids[:, :8]).memory_state).logits
    mm.detach()
    subprocess.run([sys.executable, str(SCRIPTS / "drop_read_query.py"), "--adapter", str(tmp_path / "a"),
                    "--out", str(tmp_path / "b")], check=True)
    dropped = gma6.load_adapter(base, tmp_path / "b")
    assert dropped.config.read_query == "none" and all(m.read_q is None for m in dropped.controller.layers)
    with torch.no_grad():
        got = dropped(input_ids=ids[:, 8:], memory_state=dropped(input_ids=ids[:, :8]).memory_state).logits
    assert torch.allclose(got, want, atol=1e-5)
    r = subprocess.run([sys.executable, str(SCRIPTS / "drop_read_query.py"), "--adapter", str(tmp_path / "b"),
                        "--out", str(tmp_path / "c")], capture_output=True, text=True)
    assert r.returncode != 0 and "has no read-query adapter" in r.stderr and not (tmp_path / "c").exists()
