"""The read as one Triton kernel (``memory/triton_read.py``), run through Triton's interpreter on the CPU: it must
equal ``rotated_read`` (+ ``add_read_heads``) in fp32 and stay within bf16 rounding of it in bf16. On a GPU the same
comparison is ``scripts/gpu_triton_read_check.py``."""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_gemma3, trained_base_read
from gma6 import GMA6Config, attach_memory
from gma6.integration import hook_count
from gma6.memory import triton_read as kernel
from gma6.memory.base_read import add_read_heads, rotated_read

pytest.importorskip("triton")


@pytest.fixture
def interpreted():
    """Triton's interpreter (conftest.py turns it on before triton is imported): the kernel runs on CPU tensors."""
    if not kernel.interpreting():
        pytest.skip("TRITON_INTERPRET is off: triton was imported before conftest.py could turn its interpreter on")


@pytest.fixture
def compiled_only(monkeypatch):
    """As on a machine without the interpreter: CPU tensors are not the kernel's."""
    monkeypatch.setattr(kernel, "interpreting", lambda: False)


def _read_args(dtype, kind, heads=4, groups=2, batch=2, tokens=37, d=64, slots=70, hidden=48, rank=3):
    g = torch.Generator().manual_seed(11)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    q = r(batch, heads, tokens, d)
    k, v = r(batch, groups, slots, d), r(batch, groups, slots, d)
    mask = torch.zeros(batch, 1, 1, slots)
    mask[0, ..., 5:9] = -float("inf")  # empty slots
    mask[1, ..., :3] = -2.0  # log-usage
    ang = r(tokens, d // 2)
    tables = (torch.cat([ang.cos(), ang.cos()], -1)[None, None], torch.cat([-ang.sin(), ang.sin()], -1)[None, None])
    kw: dict = {}
    if kind != "base_query":
        kw = dict(view=r(batch, tokens, hidden), down=r(rank, hidden) / 7, up=r(heads * d, rank) / 3, tables=tables)
    if kind == "before_norm":
        kw.update(q_pre=r(batch, tokens, heads * d), gain=1 + r(d) / 5, eps=1e-6)
    cast = lambda t: t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t  # noqa: E731
    kw = {n: (tuple(cast(x) for x in t) if isinstance(t, tuple) else t if n == "gain" else cast(t)) for n, t in kw.items()}
    return cast(q), cast(k), cast(v), cast(mask), kw, cast(r(batch, tokens, heads, d)), torch.tanh(r(heads * d))


@pytest.mark.parametrize("kind", ["base_query", "after_norm", "before_norm"])
@pytest.mark.parametrize("dtype,heads,groups", [(torch.float32, 4, 2), (torch.bfloat16, 4, 2), (torch.float32, 6, 2),
                                                (torch.float32, 4, 4), (torch.float32, 4, 1)])
def test_the_kernel_equals_the_eager_read(interpreted, kind, dtype, heads, groups):
    """Every query kind (the base's, an adapter's change after its q-norm, before it), query groups of 2, 3 (not a
    power of two: rows masked), 1 and 4 heads, masked slots, tokens and slots that do not fill a block: the read
    alone and added to the attention's output."""
    q, k, v, mask, kw, out, gate = _read_args(dtype, kind, heads=heads, groups=groups)
    groups = q.shape[1] // k.shape[1]
    want = rotated_read(q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1), mask, 0.1, **kw)
    got = kernel.triton_read(q, k, v, mask, 0.1, **kw)
    want_added = add_read_heads(out, want, gate)
    got_added = kernel.triton_read(q, k, v, mask, 0.1, **kw, out=out, gate=gate)
    assert got.shape == want.shape and got.dtype == want.dtype and got_added.shape == out.shape
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(got_added, want_added, atol=2e-6, rtol=1e-5)
    else:  # the eager read rounds to bf16 between its steps, the kernel once at the end
        assert (got.float() - want.float()).abs().max() <= 2 ** -6 * want.float().abs().max()
        assert (got_added.float() - want_added.float()).abs().max() <= 2 ** -6 * want_added.float().abs().max()
    assert not torch.equal(got_added, out)


@pytest.mark.parametrize("kind", ["base_query", "after_norm", "before_norm"])
def test_the_kernel_reads_strided_queries_and_masks_in_place(interpreted, kind):
    """As the model hands them over: the base's queries a transposed view of its projection (B, T, n, d), each layer's
    mask a view into rows padded to 8 entries. Same result as from dense copies."""
    q, k, v, mask, kw, out, gate = _read_args(torch.float32, kind)
    q_view = q.transpose(1, 2).contiguous().transpose(1, 2)
    padded = torch.full((*mask.shape[:-1], mask.shape[-1] + 2), 7.0)
    padded[..., : mask.shape[-1]] = mask
    mask_view = padded[..., : mask.shape[-1]]
    assert not q_view.is_contiguous() and not mask_view.is_contiguous()
    want = kernel.triton_read(q, k, v, mask, 0.1, **kw, out=out, gate=gate)
    got = kernel.triton_read(q_view, k, v, mask_view, 0.1, **kw, out=out, gate=gate)
    torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.mark.parametrize("sink", [0.7, -float("inf")])
def test_a_zero_sink_folded_into_the_softmax_reads_as_a_slot(interpreted, sink):
    """``zero_sink``: the last slot (zero key and value, its bias the sink's logit, even -inf) left out of the loop and
    started the softmax's sums with; the slots before it fill two blocks exactly."""
    q, k, v, mask, kw, out, gate = _read_args(torch.float32, "before_norm", slots=65)
    k[:, :, -1], v[:, :, -1], mask[..., -1] = 0.0, 0.0, sink
    groups = q.shape[1] // k.shape[1]
    want = rotated_read(q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1), mask, 0.1, **kw)
    kernel.LAUNCH["block_s"], chosen = 32, kernel.LAUNCH["block_s"]
    try:
        got = kernel.triton_read(q, k, v, mask, 0.1, **kw, zero_sink=True)
    finally:
        kernel.LAUNCH["block_s"] = chosen
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)


def test_a_row_whose_slots_are_all_empty_reads_zero_and_in_place_is_left_as_it_was(interpreted):
    """``zero_sink``: a row with nothing written but the sink (a fresh state's first segment) reads exactly zero, as
    the eager read does; a row whose one written slot sits in the second block of slots still reads it. ``in_place``:
    the sum lands in ``out`` itself, and an empty row's programs write nothing there (a NaN gate, which any write
    would spread, leaves it finite)."""
    q, k, v, mask, kw, out, gate = _read_args(torch.float32, "before_norm", batch=3, slots=65)
    k[:, :, -1], v[:, :, -1], mask[..., -1] = 0.0, 0.0, 0.3
    mask[0, ..., :-1] = -float("inf")  # nothing written
    mask[1, ..., :50] = -float("inf")
    mask[1, ..., 51:-1] = -float("inf")  # slot 50 alone
    groups = q.shape[1] // k.shape[1]
    want = rotated_read(q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1), mask, 0.1, **kw)
    assert torch.equal(want[0], torch.zeros_like(want[0])) and want[1].abs().min() > 0
    kernel.LAUNCH["block_s"], chosen = 32, kernel.LAUNCH["block_s"]  # the 64 slots before the sink: two blocks
    try:
        got = kernel.triton_read(q, k, v, mask, 0.1, **kw, zero_sink=True)
        added = out.clone()
        res = kernel.triton_read(q, k, v, mask, 0.1, **kw, out=added, gate=gate, zero_sink=True, in_place=True)
        nan_gate = out.clone()
        kernel.triton_read(q, k, v, mask, 0.1, **kw, out=nan_gate, gate=torch.full_like(gate, float("nan")),
                           zero_sink=True, in_place=True)
    finally:
        kernel.LAUNCH["block_s"] = chosen
    assert torch.equal(got[0], torch.zeros_like(got[0]))
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
    assert res.data_ptr() == added.data_ptr()
    torch.testing.assert_close(added, add_read_heads(out, want, gate), atol=2e-6, rtol=1e-5)
    assert torch.equal(nan_gate[0], out[0]) and nan_gate[1:].isnan().all()
    with pytest.raises(ValueError, match="in_place=True adds the read into out, and no out was given"):
        kernel.triton_read(q, k, v, mask, 0.1, **kw, zero_sink=True, in_place=True)


def test_what_the_kernel_refuses(compiled_only):
    q, k, v, mask, kw, out, gate = _read_args(torch.float32, "before_norm")
    assert "not CUDA" in kernel.unsupported(q, k, v, mask, 0.1, **kw)  # no interpreter here: CPU tensors are refused
    with pytest.raises(ValueError, match="triton_read cannot take this read: the read runs on cpu"):
        kernel.triton_read(q, k, v, mask, 0.1, **kw)


def test_what_the_kernel_refuses_where_it_could_run(interpreted):
    q, k, v, mask, kw, _, _ = _read_args(torch.float32, "before_norm")
    assert kernel.unsupported(q, k, v, mask, 0.1, **kw) is None
    up = kw["up"].clone().requires_grad_()
    assert "gradients" in kernel.unsupported(q, k, v, mask, 0.1, **{**kw, "up": up})
    with torch.no_grad():
        assert kernel.unsupported(q, k, v, mask, 0.1, **{**kw, "up": up}) is None
    # the sum it would add into: the kernel's result carries no gradient back to it
    assert "gradients" in kernel.unsupported(q, k, v, mask, 0.1, **kw, out=torch.zeros(1, requires_grad=True))
    assert "does not fold" in kernel.unsupported(q, k, v, mask, 0.1, **{**kw, "gain": None, "norm": torch.nn.Identity()})
    q48 = q[..., :48]
    assert "head size 48" in kernel.unsupported(q48, k[..., :48], v[..., :48], mask, 0.1)
    assert "dtypes" in kernel.unsupported(q.half(), k, v, mask, 0.1)
    assert "shapes" in kernel.unsupported(q, k[:1], v[:1], mask, 0.1)  # the slots of another batch


def _model(**kw):
    return trained_base_read(tiny_gemma3(layers=4, head_dim=32).float(), **kw)


def _read_and_answer(mm, ids):
    with torch.no_grad():
        state = mm.read(ids[:, :12], segment_length=4)
        return state, mm(input_ids=ids[:, 12:], memory_state=state, write=False).logits


@pytest.mark.parametrize("read_query", ["before_norm", "after_norm"])
def test_a_model_reads_through_the_kernel_as_it_reads_eagerly(interpreted, read_query, monkeypatch):
    """A memory with query adapters reads three segments and answers: the same memory states and logits (fp32) with
    ``triton_read=True``, the kernel called at every memory layer of every forward without autograd."""
    ids = torch.randint(3, 64, (2, 18), generator=torch.Generator().manual_seed(3))
    calls = []
    real = kernel.triton_read
    monkeypatch.setattr(kernel, "triton_read", lambda *a, **k: calls.append(1) or real(*a, **k))
    eager = _model(read_rank=2, read_query=read_query)
    fused = _model(read_rank=2, read_query=read_query, triton_read=True)
    want_state, want = _read_and_answer(eager, ids)
    assert not calls
    got_state, got = _read_and_answer(fused, ids)
    assert len(calls) == 3 * 4  # 3 layers x (3 segments + the answer)
    torch.testing.assert_close(got_state.memory, want_state.memory, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    fused(input_ids=ids[:, :8]).logits.sum().backward()  # training: the eager read (the kernel has no backward)
    assert len(calls) == 12 and all(layer.read_q.down.weight.grad is not None for layer in fused.controller.layers)
    fused.detach()
    eager.detach()


def test_off_cuda_the_model_reads_eagerly_and_without_triton_it_refuses(compiled_only, monkeypatch):
    """Without the interpreter the CPU read is the eager one (equal logits). Without triton
    installed, or without the attention-function read, ``triton_read=True`` is refused before anything is hooked."""
    ids = torch.randint(3, 64, (2, 18), generator=torch.Generator().manual_seed(4))
    eager, fused = _model(read_rank=2), _model(read_rank=2, triton_read=True)
    assert torch.equal(_read_and_answer(fused, ids)[1], _read_and_answer(eager, ids)[1])
    with pytest.raises(ValueError, match="triton_read=1: expected True or False"):
        GMA6Config(triton_read=1)
    base = tiny_gemma3(layers=4, head_dim=32)
    base.config._attn_implementation = "eager"
    with pytest.raises(ValueError, match="triton_read=True changes how the read .* attention implementation"):
        attach_memory(base, GMA6Config(read_rule="base", read_site="attention", write_rule="tokens",
                                       memory_dim=None, layers=[0, 1], triton_read=True))
    assert hook_count(base) == 0
    monkeypatch.setattr(kernel, "available", lambda: False)
    base = tiny_gemma3(layers=4, head_dim=32)
    with pytest.raises(ValueError, match="needs the triton package"):
        attach_memory(base, GMA6Config(read_rule="base", read_site="attention", write_rule="tokens",
                                       memory_dim=None, layers=[0, 1], triton_read=True))
    assert hook_count(base) == 0
