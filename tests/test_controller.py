"""MemoryController: the batched write (every layer at once) is the per-layer write."""

from __future__ import annotations

import pytest
import torch

from gma6 import GMA6Config
from gma6.memory import MemoryController
from gma6.state import MemoryState



@pytest.mark.parametrize("addressing", ["content", "content+usage"])
def test_batched_write_equals_the_per_layer_write(addressing):
    """The fast path (all layers at once) against the instrumented per-layer path, values and grads."""
    torch.manual_seed(0)
    cfg = GMA6Config(num_slots=4, memory_dim=16, num_heads=2, layers=[0, 2, 3], addressing=addressing).resolve(32, 4, "t")
    ctl = MemoryController(cfg)
    for p in ctl.parameters():  # away from the initial values, where gates are symmetric
        p.data.add_(0.1 * torch.randn_like(p))
    state = ctl.init_state(3)
    state = MemoryState(memory=state.memory + torch.randn_like(state.memory), usage=torch.rand_like(state.usage),
                        age=torch.randint(0, 4, state.age.shape).float(), tokens_read=state.tokens_read)
    hiddens = [torch.randn(3, 7, 32, requires_grad=True) for _ in cfg.layers]
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[1, 5:] = False
    mask[2] = False  # a sample with nothing to write keeps its memory
    fast, _ = ctl.write(state, hiddens, mask)
    slow, _ = ctl.write(state, hiddens, mask, return_stats=True)
    for name in ("memory", "usage", "age", "tokens_read"):
        assert torch.allclose(getattr(fast, name), getattr(slow, name), atol=1e-5), name
    assert torch.equal(fast.memory[2], state.memory[2])
    g_fast = torch.autograd.grad(fast.memory.square().sum(), [*hiddens, *ctl.parameters()], allow_unused=True)
    g_slow = torch.autograd.grad(slow.memory.square().sum(), [*hiddens, *ctl.parameters()], allow_unused=True)
    for a, b in zip(g_fast, g_slow):
        assert (a is None) == (b is None) and (a is None or torch.allclose(a, b, atol=1e-4))
