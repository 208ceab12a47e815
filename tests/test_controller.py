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


def _controller(seed: int = 0) -> MemoryController:
    torch.manual_seed(seed)
    cfg = GMA6Config(num_slots=4, memory_dim=16, num_heads=2, layers=[0, 2, 3]).resolve(32, 4, "t")
    ctl = MemoryController(cfg)
    for p in ctl.parameters():
        p.data.add_(0.1 * torch.randn_like(p))
    return ctl


def test_read_keys_values_of_all_layers_equal_each_gate_own():
    ctl = _controller()
    memory = torch.randn(2, 3, 4, 16)
    h = torch.randn(2, 5, 32)
    kv = ctl.read_keys_values(memory)
    assert len(kv) == 3 and all(k.shape == v.shape == (2, 2, 4, 8) for k, v in kv)  # per layer (B, n, S, d)
    for i in range(3):
        own, _ = ctl.read(i, h, memory[:, i])
        shared, _ = ctl.read(i, h, memory[:, i], kv=kv[i])
        assert torch.allclose(own, shared, atol=1e-6)


def test_stacked_weights_are_cached_without_autograd_and_follow_parameter_changes():
    ctl = _controller()
    state = ctl.init_state(2)
    hiddens = [torch.randn(2, 5, 32) for _ in range(3)]
    mask = torch.ones(2, 5, dtype=torch.bool)
    with torch.no_grad():
        first, _ = ctl.write(state, hiddens, mask)
        assert ctl._stacked("write") is ctl._stacked("write")  # cached
        ctl.layers[1].candidate.weight.mul_(2.0)  # an in-place change, as an optimizer step makes
        after, _ = ctl.write(state, hiddens, mask)
        reference, _ = ctl.write(state, hiddens, mask, return_stats=True)  # the per-layer path
    assert not torch.allclose(first.memory[:, 1], after.memory[:, 1])
    assert torch.allclose(after.memory, reference.memory, atol=1e-5)
    # with autograd nothing is cached: gradients reach each layer's own parameter
    out, _ = ctl.write(state, [h.requires_grad_() for h in hiddens], mask)
    out.memory.sum().backward()
    assert ctl.layers[1].candidate.weight.grad is not None


def test_a_controller_made_under_inference_mode_writes_without_caching():
    with torch.inference_mode():
        ctl = _controller()
        state = ctl.init_state(2)
        out, _ = ctl.write(state, [torch.randn(2, 5, 32) for _ in range(3)], torch.ones(2, 5, dtype=torch.bool))
    assert torch.isfinite(out.memory).all() and "write" not in ctl._stack_cache


def test_a_full_segment_write_skips_masking_and_writes_the_same():
    ctl = _controller()
    state = ctl.init_state(2)
    state = ctl.write(state, [torch.randn(2, 5, 32) for _ in range(3)], torch.ones(2, 5, dtype=torch.bool))[0]
    hiddens = [torch.randn(2, 7, 32) for _ in range(3)]
    mask = torch.ones(2, 7, dtype=torch.bool)
    with torch.no_grad():
        masked, _ = ctl.write(state, hiddens, mask)
        full, _ = ctl.write(state, hiddens, mask, full=True)
    for name in ("memory", "usage", "age", "tokens_read"):
        assert torch.equal(getattr(full, name), getattr(masked, name)), name
    assert full.tokens_read.dtype == torch.long and full.segments_read == masked.segments_read


def test_stacked_weights_follow_a_parameter_given_new_data():
    ctl = _controller()
    with torch.no_grad():
        before = ctl._stacked("write")["candidate_t"].clone()
        weight = ctl.layers[0].candidate.weight
        weight.data = torch.randn_like(weight)  # no version bump, new storage
        after = ctl._stacked("write")["candidate_t"]
    assert torch.equal(after[0], weight.t()) and not torch.equal(after[0], before[0])


# ------------------------------------------------------------------ write_rule="tokens"
def _token_layer(slots: int = 5, dim: int = 8, hidden: int = 12):
    from gma6.memory.layer import EnhancedMemoryLayer

    torch.manual_seed(0)
    return EnhancedMemoryLayer(hidden, dim, 2, forget_bias=3.0, write_rule="tokens")


def test_the_tokens_write_appends_the_top_scoring_tokens_in_order_and_drops_the_oldest():
    layer = _token_layer()
    b, s, t, k = 3, 5, 6, 2
    with torch.no_grad():  # a score that is the first hidden unit, so we choose which tokens win
        layer.score.weight.zero_()
        layer.score.weight[0, 0] = 1.0
        layer.norm_h.weight.fill_(1.0)
    h = torch.randn(b, t, 12) * 0.1
    h[:, 4, 0], h[:, 1, 0] = 9.0, 8.0  # tokens 4 and 1 score highest (4 first): written as 1 then 4
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[1, 2:] = False  # row 1: only tokens 0 and 1 are real (1 wins, then 0)
    mask[2] = False  # row 2: nothing to write
    memory = torch.arange(b * s, dtype=torch.float32).view(b, s, 1).expand(-1, -1, 8).clone()
    usage, age = torch.rand(b, s), torch.arange(s, 0, -1, dtype=torch.float32).expand(b, -1).clone()
    with torch.no_grad():
        new, u, a, st = layer.write_tokens(memory, h, mask, usage, age, k, 0.9, return_stats=True)
        values = torch.tanh(layer.value(layer.norm_h(h)))
        g = torch.sigmoid(layer.score(layer.norm_h(h))).squeeze(-1)
    f = torch.sigmoid(layer.forget)
    # row 0: the 3 newest old slots (decayed) then token 1, token 4
    assert torch.allclose(new[0, :3], f * memory[0, 2:], atol=1e-6)
    assert torch.allclose(new[0, 3], g[0, 1] * values[0, 1], atol=1e-6)
    assert torch.allclose(new[0, 4], g[0, 4] * values[0, 4], atol=1e-6)
    assert a[0].tolist() == [4.0, 3.0, 2.0, 0.0, 0.0] and torch.allclose(u[0, 3:], g[0, [1, 4]])
    # row 1: both real tokens written, in order (0 then 1)
    assert torch.allclose(new[1, 3], g[1, 0] * values[1, 0], atol=1e-6)
    assert torch.allclose(new[1, 4], g[1, 1] * values[1, 1], atol=1e-6)
    # row 2: unchanged
    assert torch.equal(new[2], memory[2]) and torch.equal(u[2], usage[2]) and torch.equal(a[2], age[2])
    assert st["write_attention"][0, 3, 1] == 1 and st["write_attention"][0, 4, 4] == 1


def test_a_short_row_writes_only_its_real_tokens():
    layer = _token_layer()
    h = torch.randn(1, 6, 12)
    mask = torch.tensor([[True, False, False, False, False, False]])
    memory = torch.randn(1, 5, 8)
    with torch.no_grad():
        new, _, a, _ = layer.write_tokens(memory, h, mask, torch.zeros(1, 5), torch.zeros(1, 5), 3, 0.9)
    f = torch.sigmoid(layer.forget)
    assert torch.allclose(new[0, :4], f * memory[0, 1:], atol=1e-6)  # one slot dropped, one written
    assert a[0].tolist() == [1.0, 1.0, 1.0, 1.0, 0.0]


def test_the_tokens_write_trains_score_value_and_forget_through_two_segments():
    cfg = GMA6Config(num_slots=4, memory_dim=16, num_heads=2, layers=[0, 2], write_rule="tokens",
                     tokens_per_segment=2).resolve(32, 4, "t")
    torch.manual_seed(0)
    ctl = MemoryController(cfg)
    for p in ctl.parameters():
        p.data.add_(0.1 * torch.randn_like(p))
    state = ctl.init_state(2)
    mask = torch.ones(2, 5, dtype=torch.bool)
    for _ in range(2):
        state, _ = ctl.write(state, [torch.randn(2, 5, 32) for _ in cfg.layers], mask)
    h = torch.randn(2, 3, 32)
    kv = ctl.read_keys_values(state.memory)
    out = sum(ctl.read(i, h, state.memory[:, i], kv=kv[i])[0].square().sum() for i in range(2))
    out.backward()
    for name in ("score.weight", "value.weight", "forget"):
        assert all(getattr(layer, name.split(".")[0]).grad is not None if "." not in name
                   else layer.get_parameter(name).grad is not None for layer in ctl.layers), name


@pytest.mark.parametrize("kwargs, words", [
    ({"write_rule": "fifo"}, "write_rule"),
    ({"write_rule": "tokens", "tokens_per_segment": 9, "num_slots": 4}, "tokens_per_segment=9"),
    ({"write_rule": "tokens", "addressing": "content+usage"}, "addressing"),
    ({"tokens_per_segment": 0}, "tokens_per_segment"),
])
def test_bad_write_rules_are_refused(kwargs, words):
    with pytest.raises(ValueError, match=words):
        GMA6Config(**kwargs)


@pytest.mark.parametrize("retention", ["priority", "recent"])
def test_batched_tokens_write_equals_the_per_layer_write(retention):
    """read_rule='base': the all-layers write against the instrumented per-layer one, values and gradients."""
    torch.manual_seed(0)
    cfg = GMA6Config(num_slots=5, memory_dim=None, layers=[0, 1, 2], write_rule="tokens", tokens_per_segment=3,
                     read_rule="base", token_retention=retention, usage_decay=0.9).resolve(32, 4, "t")
    ctl = MemoryController(cfg)
    for p in ctl.parameters():
        p.data.add_(0.3 * torch.randn_like(p))
    state = ctl.init_state(3)
    state = MemoryState(memory=torch.randn_like(state.memory), usage=torch.rand_like(state.usage) * 0.5,
                        age=torch.randint(0, 4, state.age.shape).float(), tokens_read=state.tokens_read)
    hiddens = [torch.randn(3, 7, 32, requires_grad=True) for _ in cfg.layers]
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[1, 2:] = False  # fewer real tokens than picks in one layer's row
    mask[2] = False  # nothing to write
    for full in (False, True):
        m = torch.ones_like(mask) if full else mask
        with torch.no_grad():  # the path reading takes
            read_path, _ = ctl.write(state, hiddens, m, full=full)
        fast = ctl._write_tokens_batched(state, hiddens, m, full)  # the same, with gradients to compare
        slow, _ = ctl.write(state, hiddens, m, return_stats=True)
        assert torch.equal(read_path.memory, fast.memory.detach())
        for name in ("memory", "usage", "age", "tokens_read"):
            assert torch.allclose(getattr(fast, name).float(), getattr(slow, name).float(), atol=1e-5), (name, full)
        params = [p for p in ctl.parameters() if p.requires_grad]
        g_fast = torch.autograd.grad((fast.memory.square().sum() + fast.usage.sum()), [*hiddens, *params], allow_unused=True)
        g_slow = torch.autograd.grad((slow.memory.square().sum() + slow.usage.sum()), [*hiddens, *params], allow_unused=True)
        for a, b in zip(g_fast, g_slow):
            assert (a is None) == (b is None) and (a is None or torch.allclose(a, b, atol=1e-4))
    with torch.no_grad():
        kept, _ = ctl.write(state, hiddens, mask)
    assert torch.equal(kept.memory[2], state.memory[2]) and torch.equal(kept.usage[2], state.usage[2])
