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


def test_derived_under_autograd_is_made_once_a_step_and_again_after_a_backward_reaches_it():
    """Under autograd ``derived`` keeps what it made (with its graph) until a backward reaches it or a parameter
    changes: segments of one step share it, gradients are those of making it afresh each time, a second step
    (gradient accumulation, no optimizer step) makes it again (the first backward freed its graph), and an optimizer
    step or no_grad changes what is returned as they should."""
    from gma6.memory.attention import derived

    w = torch.nn.Parameter(torch.randn(3, 4))
    made = []

    def make():
        made.append(1)
        return {"sq": w * w, "t": w.t()}  # the product saves its inputs for backward

    cache: dict = {}
    xs = [torch.randn(4, 3) for _ in range(3)]

    def step(use_cache: bool) -> torch.Tensor:
        loss = 0.0
        for x in xs:  # three "segments"
            got = derived(cache, "w", [w], make) if use_cache else make()
            loss = loss + (got["sq"] * x.t()).sum() + (got["t"] * x).sum()
        loss.backward()
        return w.grad.clone()

    ref = step(False)
    w.grad = None
    made.clear()
    assert torch.allclose(step(True), ref) and len(made) == 1
    assert torch.allclose(step(True), 2 * ref) and len(made) == 2  # accumulated: made again, no freed graph reused
    with torch.no_grad():
        w.add_(1.0)  # an optimizer step
    w.grad = None
    got = derived(cache, "w", [w], make)
    assert torch.equal(got["sq"], w * w) and len(made) == 3
    with torch.no_grad():
        assert derived(cache, "w", [w], make)["sq"].grad_fn is None and len(made) == 4


def test_derived_under_autograd_inside_a_checkpoint_keeps_the_recomputation_consistent():
    """Made inside a checkpointed function (a read's query adapter casts its weights there), what is kept saves its
    own tensors: the recomputation, which finds it made, saves what the forward saved, and the gradients are those of
    making it afresh."""
    import torch.utils.checkpoint as ckpt

    from gma6.memory.attention import derived

    w = torch.nn.Parameter(torch.randn(4, 4))
    cache: dict = {}

    def fn(x: torch.Tensor, use_cache: bool) -> torch.Tensor:
        sq = derived(cache, "w", [w], lambda: w * w) if use_cache else w * w
        return (x @ sq).tanh()

    xs = [torch.randn(2, 4, requires_grad=True) for _ in range(3)]
    grads = []
    for use_cache in (False, True):
        w.grad = None
        loss = sum(ckpt.checkpoint(fn, x, use_cache, use_reentrant=False).sum() for x in xs)
        loss.backward()
        grads.append(w.grad.clone())
    assert torch.allclose(grads[0], grads[1])


def test_derived_lets_the_stale_value_and_its_graph_go_before_making_the_next():
    """A parameter's gradient accumulator lives as long as a graph using it; one kept from the step before (made on
    another CUDA stream, say) must be gone when the next step's value is made, so that it gets a fresh one."""
    import weakref

    from gma6.memory.attention import derived

    w = torch.nn.Parameter(torch.randn(3, 4))
    cache: dict = {}
    old_alive: list[bool] = []
    refs: list[weakref.ref] = []

    def make():
        old_alive.append(bool(refs) and refs[-1]() is not None)
        value = w * 2.0
        refs.append(weakref.ref(value))
        return value

    for _ in range(3):  # training steps: forward, backward, optimizer step
        derived(cache, "w", [w], make).sum().backward()
        with torch.no_grad():
            w.add_(0.1)
    with torch.no_grad():  # and without autograd: the same, a cast kept until the weight changes
        derived(cache, "w", [w], make)
        w.add_(0.1)
        derived(cache, "w", [w], make)
    assert old_alive == [False] * 5
