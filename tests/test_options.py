"""The five system options on a tiny Gemma 3: each one works (not how fast)."""

from __future__ import annotations

import copy
import sys

import pytest
import torch

import gma6.options as options
from gma6 import GMA6Config, MemoryModel, attach_memory
from gma6.integration import find_decoder_layers, hook_count
from gma6.options import MemoryBudgetError, check_memory_budget, estimate_peak_bytes, plan_batch

from conftest import perturb as _perturb
from conftest import tiny_gemma3

SMALL = dict(num_slots=4, memory_dim=16, num_heads=2)


def _pair(**options_on):
    """The same tiny base and memory weights twice: once plain, once with ``options_on``."""
    plain = attach_memory(tiny_gemma3(), GMA6Config(**SMALL))
    _perturb(plain)
    other = attach_memory(tiny_gemma3(), GMA6Config(**SMALL, **options_on))
    other.controller.load_state_dict(plain.controller.state_dict())
    return plain, other


def _ids(b=2, t=24, seed=1):
    return torch.randint(3, 64, (b, t), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------ use_half_precision
def test_half_precision_casts_base_keeps_memory_fp32():
    plain, half = _pair(use_half_precision=True)
    assert {p.dtype for p in half.base.parameters()} == {torch.bfloat16}  # CPU supports bf16
    assert {p.dtype for p in half.controller.parameters()} == {torch.float32}
    x = _ids()
    s_plain, s_half = plain.init_state(2), half.init_state(2)
    for _ in range(3):  # the state stays fp32 across writes
        ref, out = plain(input_ids=x, memory_state=s_plain), half(input_ids=x, memory_state=s_half)
        s_plain, s_half = ref.memory_state, out.memory_state
        assert out.memory_state.memory.dtype == torch.float32
        assert torch.isfinite(out.logits.float()).all()
        # bf16 keeps ~3 significant digits: the logits agree to a bf16 tolerance...
        diff = (out.logits.float() - ref.logits).abs().max().item()
        assert diff <= 0.05 * ref.logits.abs().max().item() + 0.05, diff
        # ...and the greedy next token agrees wherever fp32's top-2 margin exceeds that tolerance.
        top2 = ref.logits[:, -1].topk(2, dim=-1).values
        clear = (top2[:, 0] - top2[:, 1]) > 2 * diff
        assert torch.equal(out.logits[:, -1].argmax(-1)[clear], ref.logits[:, -1].argmax(-1)[clear])
    assert (s_half.memory - s_plain.memory).norm() < 0.05 * s_plain.memory.norm()  # fp32 maths, bf16 inputs


def test_half_precision_trains_memory_in_fp32():
    _, half = _pair(use_half_precision=True)
    x = _ids()
    out = half(input_ids=x, labels=x, memory_state=half(input_ids=x).memory_state)
    out.loss.backward()
    grads = [p.grad for p in half.memory_parameters()]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert all(p.grad is None for p in half.base.parameters())


def test_half_dtype_choice():
    assert options.half_dtype("cpu") == torch.bfloat16
    if torch.cuda.is_available():
        assert options.half_dtype("cuda") == (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)


# --------------------------------------------------------------------- use_4bit_quantization
def test_4bit_without_bitsandbytes_is_a_clear_error(tiny_model, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if it were not installed
    with pytest.raises(ImportError, match="needs bitsandbytes"):
        attach_memory(tiny_model, GMA6Config(use_4bit_quantization=True, **SMALL))
    assert hook_count(tiny_model) == 0
    with pytest.raises(ImportError, match="needs bitsandbytes"):
        options.quantization_config()
    with pytest.raises(ImportError, match="needs bitsandbytes"):
        options.quantized_load_kwargs()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_4bit_on_a_missing_cuda_device_is_a_clear_error():
    pytest.importorskip("bitsandbytes")
    with pytest.raises(RuntimeError, match="no CUDA device"):
        options.quantized_load_kwargs(device="cuda")


def test_4bit_base_on_cpu_keeps_outputs_and_trains_only_the_memory(tmp_path):
    """The real thing on this CPU (bitsandbytes >= 0.48 runs NF4 there): load in 4 bits, attach, train."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    # every projection 32-wide or more: bitsandbytes packs CPU weights in blocks of 32 rows where the CPU has
    # AVX512-BF16 and then refuses narrower ones (a 16-wide k/v projection)
    tiny_gemma3(hidden=64, head_dim=32).save_pretrained(tmp_path)
    base = AutoModelForCausalLM.from_pretrained(tmp_path, **options.quantized_load_kwargs(device="cpu"))
    options.keep_4bit_differentiable(base)  # what attaching does; the reference below must use the same kernel
    assert options.is_loaded_in_4bit(base)
    assert any(type(m).__name__ == "Linear4bit" for m in base.modules())
    x = _ids()
    with torch.no_grad():
        ref = base(input_ids=x).logits
    frozen = {n: p.detach().clone() for n, p in base.named_parameters()}
    mm = attach_memory(base, GMA6Config(use_4bit_quantization=True, **SMALL))
    with torch.no_grad():
        assert torch.equal(mm(input_ids=x).logits, ref)  # unchanged at init
    _perturb(mm)
    opt = torch.optim.AdamW(mm.memory_parameters(), lr=1e-2)
    state = mm.read(_ids(t=24), segment_length=8)
    losses = []
    for _ in range(3):
        loss = mm(input_ids=x, labels=x, memory_state=state.detach()).loss
        loss.backward()
        assert all(p.grad is None for p in mm.base.parameters())
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    assert all(torch.equal(p, frozen[n]) for n, p in mm.base.named_parameters())


def test_4bit_needs_a_base_loaded_in_4bit(tiny_model, monkeypatch):
    monkeypatch.setattr(options, "check_4bit_available", lambda *a, **k: None)
    with pytest.raises(ValueError, match="loaded in 4 bits"):
        attach_memory(tiny_model, GMA6Config(use_4bit_quantization=True, **SMALL))


def test_4bit_base_attaches_frozen_and_is_not_cast(tiny_model, monkeypatch):
    """A base marked as transformers marks a bitsandbytes 4-bit model attaches; half precision leaves it alone."""
    monkeypatch.setattr(options, "check_4bit_available", lambda *a, **k: None)
    tiny_model.hf_quantizer = object()  # what from_pretrained(quantization_config=...) leaves behind
    tiny_model.is_loaded_in_4bit = True
    tiny_model.quantization_method = "bitsandbytes"
    assert options.is_quantized(tiny_model)

    def refuse(*a, **k):
        raise ValueError("You cannot cast a bitsandbytes model in a new `dtype`")

    monkeypatch.setattr(tiny_model, "to", refuse)
    mm = attach_memory(tiny_model, GMA6Config(use_4bit_quantization=True, use_half_precision=True, **SMALL))
    assert {p.dtype for p in mm.base.parameters()} == {torch.float32}
    assert not any(p.requires_grad for p in mm.base.parameters())
    assert mm.memory_parameters()
    assert not getattr(mm, "is_quantized", False)  # transformers' Trainer check reads this attribute
    out = mm(input_ids=_ids(), labels=_ids())
    out.loss.backward()


def test_quantization_config_when_available(monkeypatch):
    monkeypatch.setattr(options, "check_4bit_available", lambda *a, **k: None)
    qc = options.quantization_config(torch.bfloat16)
    assert qc.load_in_4bit and qc.bnb_4bit_quant_type == "nf4" and qc.bnb_4bit_compute_dtype == torch.bfloat16


# ---------------------------------------------------------------------------- offload_to_cpu
def test_offload_states_on_cpu_and_results_equal(monkeypatch):
    plain, off = _pair(offload_to_cpu=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    plain.to(device)
    off.to(device)
    moves = []
    original = type(off.init_state(1)).to

    def spy(self, device=None, dtype=None):
        moves.append(str(device))
        if isinstance(device, torch.device):  # only the move to the memory's device passes a torch.device
            moves_in.append(device)
        return original(self, device, dtype)

    moves_in = []

    monkeypatch.setattr(type(off.init_state(1)), "to", spy)
    x = _ids(t=40).to(device)
    assert off.init_state(2).memory.device.type == "cpu"
    s = off(input_ids=x[:, :8]).memory_state
    assert s.memory.device.type == "cpu" and s.usage.device.type == "cpu" and s.tokens_read.device.type == "cpu"
    moves.clear()
    state = off.read(x, segment_length=8)
    assert moves.count("cpu") >= 5  # each of the 5 segments hands its state back to the CPU
    assert len(moves_in) >= 5 and all(d == off.device for d in moves_in)  # ... and takes it to the memory's device first
    ref = plain.read(x, segment_length=8)
    assert state.memory.device.type == "cpu" and state.age.device.type == "cpu"
    assert torch.allclose(state.memory, ref.memory.cpu(), atol=1e-6)
    assert torch.equal(state.age, ref.age.cpu()) and torch.allclose(state.usage, ref.usage.cpu(), atol=1e-6)
    assert state.segments_read == ref.segments_read == 5
    # an offloaded state can be fed back in
    a = off(input_ids=x[:, :8], memory_state=state).logits
    b = plain(input_ids=x[:, :8], memory_state=ref).logits
    assert torch.allclose(a, b, atol=1e-5)


# -------------------------------------------------------------------------- max_memory_usage
def test_budget_refuses_before_running(monkeypatch):
    mm = attach_memory(tiny_gemma3(), GMA6Config(max_memory_usage=1e-5, **SMALL))
    ran = []
    monkeypatch.setattr(mm.base, "forward", lambda *a, **k: ran.append(1))
    with pytest.raises(MemoryError, match=r"max_memory_usage=1e-05 GiB.*even batch 1 does not fit"):
        mm.read(_ids(t=40), segment_length=8)
    with pytest.raises(ValueError):  # also a ValueError
        mm.read(_ids(t=40), segment_length=8)
    assert not ran
    with pytest.raises(MemoryBudgetError):
        plan_batch(mm, 8)


def test_budget_names_the_batch_that_fits():
    mm = attach_memory(tiny_gemma3(), GMA6Config(**SMALL))
    one = estimate_peak_bytes(mm, 1, 64)
    budget = (one + 2.5 * (estimate_peak_bytes(mm, 2, 64) - one)) / 1024**3
    assert plan_batch(mm, 64, budget) == 3
    with pytest.raises(MemoryBudgetError, match="batch 3 fits"):
        check_memory_budget(mm, 8, 64, budget)
    check_memory_budget(mm, 3, 64, budget)


def test_large_budget_runs_and_equals_no_budget():
    plain, budgeted = _pair(max_memory_usage=100.0)
    x = _ids(t=40)
    assert torch.equal(budgeted.read(x, segment_length=8).memory, plain.read(x, segment_length=8).memory)
    assert plan_batch(budgeted, 8) > 1000


def test_estimate_grows_with_batch_segment_and_training():
    mm = attach_memory(tiny_gemma3(), GMA6Config(**SMALL))
    e = lambda *a, **k: estimate_peak_bytes(mm, *a, **k)  # noqa: E731
    assert e(1, 64) < e(2, 64) < e(2, 128) < e(2, 128, training=True) < e(2, 128, training=True, segments=3)
    assert e(1, 64) > options.parameter_bytes(mm)
    base_only = estimate_peak_bytes(mm.base, 1, 64)
    assert base_only < e(1, 64)
    with pytest.raises(ValueError, match="needs a budget"):
        plan_batch(mm, 64)


def test_estimate_is_in_the_right_range_for_a_real_sized_layer():
    """Against a hand count for one big segment: parameters plus a layer's worth of activations."""
    base = tiny_gemma3(hidden=64, layers=2, vocab=1000)
    est = estimate_peak_bytes(base, 4, 512)
    params = options.parameter_bytes(base)
    scores = 4 * 4 * 2 * 512 * 512  # fp32, batch 4, 2 heads
    assert params + scores < est < params + 20 * scores


# --------------------------------------------------------------------- gradient_checkpointing
def _grads_and_calls(checkpointing: bool):
    mm = attach_memory(tiny_gemma3(), GMA6Config(gradient_checkpointing=checkpointing, **SMALL))
    _perturb(mm)
    mm.train()
    reads, mlp_runs, hook_runs = [], [], []
    read = mm.controller.read
    mm.controller.read = lambda *a, **k: (reads.append(a[0]), read(*a, **k))[1]
    for i in mm.config.layers:
        layer = find_decoder_layers(mm.base)[i]
        layer.mlp.register_forward_hook(lambda *a: mlp_runs.append(1))
        layer.register_forward_hook(lambda *a: hook_runs.append(1))  # fires where (and as often as) ours does
    x = _ids()
    state = mm.init_state(2)
    out = mm(input_ids=x, memory_state=state)
    out = mm(input_ids=x, labels=x, memory_state=out.memory_state)
    after_forward = (list(reads), len(mlp_runs), len(hook_runs))
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in mm.controller.named_parameters()}
    return mm, grads, after_forward, (list(reads), len(mlp_runs), len(hook_runs))


def test_gradient_checkpointing_hooks_once_and_same_gradients():
    mm, ref, _, (ref_reads, ref_mlp, ref_hooks) = _grads_and_calls(False)
    n = len(mm.config.layers)
    assert sorted(ref_reads) == sorted(list(range(n)) * 2)  # 2 segments, one read per memory layer each
    ck, grads, (fwd_reads, fwd_mlp, fwd_hooks), (reads, mlp, hooks) = _grads_and_calls(True)
    assert any(getattr(m, "gradient_checkpointing", False) is True for m in ck.base.modules())
    assert sorted(fwd_reads) == sorted(list(range(n)) * 2)
    assert hooks == fwd_hooks == ref_hooks == 2 * n  # the hooks fire once a forward, never in backward
    # ...although the layers were recomputed: all but the lowest memory layer (nothing below it needs gradients)
    assert fwd_mlp == ref_mlp == 2 * n and mlp - fwd_mlp == 2 * (n - 1)
    # the read itself is recomputed once in backward, inside its own checkpoint, like the layer it hooks
    assert sorted(reads) == sorted(fwd_reads * 2)
    for name, g in ref.items():
        assert torch.allclose(grads[name], g, atol=1e-5), name
    assert any(g.abs().max() > 0 for g in grads.values())


def test_under_checkpointing_the_backward_reaches_no_lower_than_the_memory():
    """transformers' checkpointing makes the input embeddings require grad (for reentrant checkpoints); the memory's
    non-reentrant checkpointing takes that back, so the layers below the memory's (here 0-2 of 4) are neither
    recorded for backward nor recomputed in it, and the gradients are those without checkpointing."""
    def run(checkpointing: bool):
        mm = attach_memory(tiny_gemma3(), GMA6Config(gradient_checkpointing=checkpointing, layers=[2], **SMALL))
        _perturb(mm)
        mm.train()
        runs, needs_grad = [0] * 4, [None] * 4
        for i, layer in enumerate(find_decoder_layers(mm.base)):
            def seen(module, args, out, i=i):
                runs[i] += 1
                needs_grad[i] = out.requires_grad
            layer.mlp.register_forward_hook(seen)
        x = _ids()
        out = mm(input_ids=x, memory_state=mm.init_state(2))
        out = mm(input_ids=x, labels=x, memory_state=out.memory_state)
        out.loss.backward()
        return runs, needs_grad, {n: p.grad for n, p in mm.controller.named_parameters()}

    ref_runs, ref_needs, ref = run(False)
    runs, needs, grads = run(True)
    assert ref_runs == [2, 2, 2, 2] and ref_needs == needs == [False, False, False, True]
    # only layer 3 recomputed, for the second segment (no loss on the first, whose write reads layer 2)
    assert runs == [2, 2, 2, 3]
    for name, g in ref.items():
        torch.testing.assert_close(grads[name], g, atol=1e-5, rtol=1e-4)
    assert any(g.abs().max() > 0 for g in grads.values())
    base = tiny_gemma3()
    options.set_gradient_checkpointing(base, True)
    assert getattr(base, "_require_grads_hook", None) is None
    options.set_gradient_checkpointing(base, False)
    assert getattr(base, "_require_grads_hook", None) is None
    base.enable_input_require_grads()  # the user's own stays, on and off
    options.set_gradient_checkpointing(base, True)
    assert base._require_grads_hook is not None
    options.set_gradient_checkpointing(base, False)
    assert base._require_grads_hook is not None


def test_options_do_not_touch_a_plain_base(tiny_model):
    before = copy.deepcopy(tiny_model.state_dict())
    mm = attach_memory(tiny_model, GMA6Config(**SMALL))
    assert {p.dtype for p in mm.base.parameters()} == {torch.float32}
    assert not any(getattr(m, "gradient_checkpointing", False) is True for m in mm.base.modules())
    assert all(torch.equal(v, before[k]) for k, v in mm.base.state_dict().items())


def test_budget_also_guards_the_rmt_peer(monkeypatch):
    cfg = dict(memory_type="rmt", num_slots=4)
    mm = attach_memory(tiny_gemma3(), GMA6Config(max_memory_usage=1e-5, **cfg))
    ran = []
    monkeypatch.setattr(mm.base, "forward", lambda *a, **k: ran.append(1))
    with pytest.raises(MemoryBudgetError, match="max_memory_usage"):
        mm.read(_ids(t=40), segment_length=8)
    assert not ran
    mm.detach()
    rmt = attach_memory(tiny_gemma3(), GMA6Config(**cfg))
    gated = attach_memory(tiny_gemma3(), GMA6Config(memory_type="gated", num_slots=4, memory_dim=16, num_heads=2))
    # 2 x 4 memory tokens more through the base than the segment alone
    assert estimate_peak_bytes(rmt, 1, 64) > estimate_peak_bytes(rmt.base, 1, 64 + 8) > estimate_peak_bytes(gated.base, 1, 64)
    out = attach_memory(tiny_gemma3(), GMA6Config(max_memory_usage=100.0, **cfg)).read(_ids(t=40), segment_length=8)
    assert out.memory.shape[2] == 4


def test_under_checkpointing_the_memory_keeps_no_activation_of_its_own_for_backward():
    """transformers checkpoints a layer's forward, not its hooks: the read and the write checkpoint
    themselves, so what autograd keeps is their inputs, saved by the checkpoint, not their per-token
    insides."""
    import traceback

    def saved_from_memory(checkpointing: bool) -> list[str]:
        mm = attach_memory(tiny_gemma3(), GMA6Config(gradient_checkpointing=checkpointing, **SMALL))
        _perturb(mm)
        mm.train()
        where = []

        def pack(t):
            frames = [f for f in traceback.extract_stack()[:-1] if "/torch/" not in f.filename]
            names = {f.name for f in frames[-3:]}
            # the slots' keys and values (one (B, L, S, D) step a segment, before the forward) may stay
            if frames and "/gma6/memory/" in frames[-1].filename.replace("\\", "/") and "read_keys_values" not in names:
                where.append(f"{frames[-1].filename}:{frames[-1].lineno} {frames[-1].name}")
            return t

        x = _ids()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = mm(input_ids=x, memory_state=mm.init_state(2))
            out = mm(input_ids=x, labels=x, memory_state=out.memory_state)
        out.loss.backward()
        return where

    assert saved_from_memory(False)  # without checkpointing the read and write keep their activations
    assert saved_from_memory(True) == []


def test_4bit_layers_keep_their_backward_after_an_inference_call(tmp_path):
    """bitsandbytes repacks CPU 4-bit weights for AVX512-BF16 on an eval call without gradient, onto a kernel
    with no backward; attaching a memory must undo that, or gradients stop silently inside the base."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    tiny_gemma3(hidden=64, head_dim=32).save_pretrained(tmp_path)
    base = AutoModelForCausalLM.from_pretrained(tmp_path, **options.quantized_load_kwargs(device="cpu"))
    x = _ids()
    with torch.no_grad():
        base(input_ids=x)  # where the CPU has AVX512-BF16, this repacks every 4-bit layer
    layers = [m for m in base.modules() if type(m).__name__ == "Linear4bit"]
    packed = sum(bool(getattr(m.weight.quant_state, "packing_format_for_cpu", False)) for m in layers)
    mm = attach_memory(base, GMA6Config(use_4bit_quantization=True, **SMALL))
    assert all(not getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    assert all(m.support_avx512bf16_for_cpu is False for m in layers)
    assert options.keep_4bit_differentiable(mm.base) == 0  # nothing left to undo
    # a gradient reaches an input of the first layer through every later 4-bit layer
    probe = torch.zeros((), requires_grad=True)
    handle = mm.base.get_input_embeddings().register_forward_hook(lambda m, i, out: out + probe)
    try:
        with mm.memory_disabled():
            mm.base(input_ids=x).logits.float().square().mean().backward()
    finally:
        handle.remove()
    assert probe.grad is not None and probe.grad.abs() > 0, f"no gradient through the 4-bit base ({packed} layers had been packed)"


def test_set_gradient_checkpointing_passes_checkpoint_arguments_and_stays_non_reentrant(tiny_model):
    """More checkpoint arguments reach the layers' checkpoint function (a CUDA-graph capture needs
    ``preserve_rng_state=False``); reentrant checkpoints are refused by name."""
    from gma6.options import set_gradient_checkpointing

    base = tiny_model
    set_gradient_checkpointing(base, True, preserve_rng_state=False)
    funcs = [m._gradient_checkpointing_func for m in base.modules() if getattr(m, "gradient_checkpointing", False)]
    assert funcs and all(f.keywords == {"preserve_rng_state": False, "use_reentrant": False} for f in funcs)
    with pytest.raises(ValueError, match="use_reentrant"):
        set_gradient_checkpointing(base, True, use_reentrant=True)
    set_gradient_checkpointing(base, False)
    assert not any(getattr(m, "gradient_checkpointing", False) for m in base.modules())
