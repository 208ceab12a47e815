"""The proof that write → carry → read works: a frozen tiny Gemma 3 learns to recall a key."""

from __future__ import annotations

import torch

from gma6 import GMA6Config, attach_memory

from conftest import tiny_gemma3

KEYS = torch.arange(10, 26)  # 16 keys
SEG, N_SEG, QUERY = 8, 3, 5


def key_batch(keys: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """The key at the start of segment 1; random filler everywhere else; a query token at the end."""
    x = torch.randint(30, 64, (len(keys), SEG * N_SEG), generator=g)
    x[:, 0] = keys
    x[:, -1] = QUERY
    return x


def accuracy_and_loss(mm, x: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    state = mm.init_state(x.shape[0])
    for s in range(0, x.shape[1], SEG):
        out = mm(input_ids=x[:, s : s + SEG], memory_state=state, logits_to_keep=1)
        state = out.memory_state
    logits = out.logits[:, -1]
    return (logits.argmax(-1) == keys).float().mean(), torch.nn.functional.cross_entropy(logits, keys)


def test_frozen_tiny_gemma_learns_to_carry_a_key_across_segments():
    torch.manual_seed(0)
    base = tiny_gemma3(seed=0, layers=4, hidden=32)
    mm = attach_memory(base, GMA6Config(num_slots=8, memory_dim=32, num_heads=2, layers=[1, 3]))
    opt = torch.optim.AdamW(mm.memory_parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    test = key_batch(KEYS, torch.Generator().manual_seed(123))
    before, _ = accuracy_and_loss(mm, test, KEYS)
    for step in range(300):
        keys = KEYS[torch.randint(0, 16, (32,), generator=g)]
        _, loss = accuracy_and_loss(mm, key_batch(keys, g), keys)
        loss.backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        after, _ = accuracy_and_loss(mm, test, KEYS)
        with mm.memory_disabled():
            bare, _ = accuracy_and_loss(mm, test, KEYS)
    assert before <= 0.25 and bare <= 0.25  # chance is 1/16
    assert after >= 0.9, f"accuracy {after:.2f}"
