"""The tokens write's Triton kernels (``memory/triton_write.py``), run through Triton's interpreter on the CPU: the
same new slots, usage and age as the eager batched write, for full segments, padded ones and samples with nothing to
write; refused where they cannot apply."""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_gemma3, trained_base_read
from gma6 import GMA6Config, MemoryState, attach_memory
from gma6.integration import hook_count
from gma6.memory import triton_read, triton_write
from gma6.memory.controller import MemoryController

pytest.importorskip("triton")


@pytest.fixture
def interpreted():
    if not triton_read.interpreting():
        pytest.skip("TRITON_INTERPRET is off: triton was imported before conftest.py could turn its interpreter on")


def _controller(retention: str, fused: bool) -> MemoryController:
    cfg = GMA6Config(num_slots=5, memory_dim=None, layers=[0, 1, 2], write_rule="tokens", tokens_per_segment=3,
                     read_rule="base", token_retention=retention, usage_decay=0.9,
                     triton_write=fused).resolve(40, 4, "t")
    torch.manual_seed(0)
    ctl = MemoryController(cfg)
    for p in ctl.parameters():
        p.data.add_(0.3 * torch.randn_like(p))
    return ctl


@pytest.mark.parametrize("retention", ["priority", "recent"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_kernels_write_what_the_eager_write_writes(interpreted, retention, dtype):
    """Hidden states in the base's dtype, an fp32 memory: the fresh one (an expanded view: stride 0 over the batch)
    and a written one; full segments, a row with fewer real tokens than picks, a row with none."""
    eager, fused = _controller(retention, False), _controller(retention, True)
    g = torch.Generator().manual_seed(1)
    hiddens = [torch.randn(3, 7, 40, generator=g).to(dtype) for _ in range(3)]
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[1, 2:] = False
    mask[2] = False
    fresh = eager.init_state(3)
    assert fresh.memory.stride(0) == 0
    written = MemoryState(memory=torch.randn(fresh.memory.shape, generator=g), usage=torch.rand(fresh.usage.shape, generator=g),
                          age=torch.randint(0, 4, fresh.age.shape, generator=g).float(), tokens_read=fresh.tokens_read)
    with torch.no_grad():
        for state in (fresh, written):
            for m, full in ((torch.ones_like(mask), True), (mask, False)):
                want, _ = eager.write(state, hiddens, m, full=full)
                got, _ = fused.write(state, hiddens, m, full=full)
                assert got.memory.is_contiguous() and got.memory.dtype == want.memory.dtype
                for name in ("memory", "age", "tokens_read"):  # the same slots picked and kept
                    assert torch.equal(getattr(got, name), getattr(want, name)), (name, full)
                # the usage is the picks' sigmoid(score): the same sums in another order
                torch.testing.assert_close(got.usage, want.usage, atol=1e-6, rtol=1e-6)
                assert got.segments_read == want.segments_read
        kept, _ = fused.write(written, hiddens, mask)
    assert torch.equal(kept.memory[2], written.memory[2]) and torch.equal(kept.usage[2], written.usage[2])


def test_the_scores_kernel_equals_the_formula(interpreted):
    g = torch.Generator().manual_seed(2)
    h = torch.randn(2, 3, 37, 200, generator=g).bfloat16()  # a hidden size that does not fill its last block
    w, b = torch.randn(2, 200, generator=g), torch.randn(2, generator=g)
    x = h.float()
    want = (x @ w[:, None, :, None]).squeeze(-1) * torch.rsqrt(x.square().mean(-1) + 1e-6) + b[:, None, None]
    torch.testing.assert_close(triton_write.token_scores(h, w, b, 1e-6), want, atol=1e-5, rtol=1e-5)


def _read_and_answer(mm, ids):
    with torch.no_grad():
        state = mm.read(ids[:, :12], segment_length=4)
        return state, mm(input_ids=ids[:, 12:], memory_state=state, write=False).logits


def test_a_model_writes_through_the_kernels_as_it_writes_eagerly(interpreted):
    ids = torch.randint(3, 64, (2, 18), generator=torch.Generator().manual_seed(3))
    eager = trained_base_read(tiny_gemma3(layers=4, head_dim=32).float(), read_rank=2)
    fused = trained_base_read(tiny_gemma3(layers=4, head_dim=32).float(), read_rank=2, triton_write=True)
    want_state, want = _read_and_answer(eager, ids)
    got_state, got = _read_and_answer(fused, ids)
    # later segments read a usage a rounding apart, so their hidden states (and slots) are
    torch.testing.assert_close(got_state.memory, want_state.memory, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_state.usage, want_state.usage, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # training: the eager write, gradients through it (the score's through the usage the next segment reads)
    state = fused(input_ids=ids[:, :4]).memory_state
    fused(input_ids=ids[:, 4:8], memory_state=state).logits.sum().backward()
    assert all(layer.score.weight.grad is not None for layer in fused.controller.layers)


def test_where_the_kernels_cannot_apply(monkeypatch):
    h = torch.randn(1, 2, 3, 8, requires_grad=True)
    assert not triton_write.applies(h)  # autograd: the eager write
    with torch.no_grad():
        assert triton_write.applies(h) == triton_read.interpreting()  # a CPU tensor only under the interpreter
    with pytest.raises(ValueError, match="triton_write=True changes the batched tokens write: it needs "
                                         "write_rule='tokens' and read_rule='base', not 'slots'"):
        attach_memory(tiny_gemma3(layers=4), GMA6Config(layers=[0, 1], write_rule="slots", triton_write=True))
    monkeypatch.setattr(triton_read, "available", lambda: False)
    base = tiny_gemma3(layers=4, head_dim=32)
    with pytest.raises(ValueError, match="triton_write=True needs the triton package"):
        attach_memory(base, GMA6Config(read_rule="base", read_site="attention", write_rule="tokens",
                                       memory_dim=None, layers=[0, 1], triton_write=True))
    assert hook_count(base) == 0
    with pytest.raises(ValueError, match="triton_write='yes': expected True or False"):
        GMA6Config(triton_write="yes")
