"""MemoryAttentionGate: the read, in the memory's precision and in a half-precision base's."""

from __future__ import annotations

import torch

from gma6.memory import MemoryAttentionGate


def _gate() -> MemoryAttentionGate:
    torch.manual_seed(0)
    gate = MemoryAttentionGate(64, 32, 4)
    with torch.no_grad():
        for p in gate.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return gate


def test_fresh_gate_reads_nothing():
    gate = MemoryAttentionGate(64, 32, 4)
    delta, _ = gate(torch.randn(2, 5, 64), torch.randn(2, 6, 32))
    assert torch.equal(delta, torch.zeros_like(delta))


def test_bf16_stream_is_read_in_bf16_at_inference_close_to_fp32():
    gate = _gate()
    h = (5 * torch.randn(2, 10, 64)).to(torch.bfloat16)
    memory = torch.randn(2, 6, 32)
    with torch.no_grad():
        fast, _ = gate(h, memory)
    slow, _ = gate(h, memory)  # autograd on: the fp32 path
    assert fast.dtype == torch.bfloat16 and slow.dtype == torch.float32
    assert (fast.float() - slow.detach()).norm() / slow.detach().norm() < 0.02


def test_half_weights_follow_parameter_changes():
    gate = _gate()
    h = torch.randn(1, 4, 64).to(torch.bfloat16)
    memory = torch.randn(1, 6, 32)
    with torch.no_grad():
        before, _ = gate(h, memory)
        gate.out.weight.mul_(-1.0)  # in place, as an optimizer step
        after, _ = gate(h, memory)
    torch.testing.assert_close(after, -before)
