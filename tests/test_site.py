"""site.py: the attention-site read carried by the base's own attention function (its post-RoPE queries)."""

from __future__ import annotations

import pytest
import torch
from conftest import base_read_config, perturb, tiny_gemma3, trained_base_read

from gma6 import GMA6Config
from gma6.integration import hook_count
from gma6.model import attach_memory
from gma6.site import AttentionSites, supported


_config = base_read_config
_trained = trained_base_read


def _two_segments(mm, ids):
    state = mm(input_ids=ids[:, :8]).memory_state
    return mm(input_ids=ids[:, 8:], memory_state=state, write=False).logits


def test_the_read_takes_the_bases_queries_and_equals_the_hooks_read():
    """SDPA base: the attention function reads (no q-norm or RoPE of its own); an eager base (which cannot
    carry it) reads through the q/o projection hooks; the logits agree, and differ from the bare base's."""
    ids = torch.randint(3, 64, (2, 14), generator=torch.Generator().manual_seed(0))
    sdpa = tiny_gemma3(layers=4).float()
    eager = tiny_gemma3(layers=4).float()
    eager.config._attn_implementation = "eager"
    bare = sdpa(input_ids=ids[:, 8:]).logits
    a, b = _trained(sdpa), _trained(eager)
    assert a._sites is not None and b._sites is None
    attns = [sdpa.model.layers[i + 1].self_attn for i in (0, 1, 2)]
    assert all(AttentionSites.active(m) for m in attns) and sdpa.config._attn_implementation == "gma6_sdpa"
    with torch.no_grad():
        got, want = _two_segments(a, ids), _two_segments(b, ids)
        # return_stats takes the explicit read through the hooks on the same model
        state = a(input_ids=ids[:, :8]).memory_state
        explicit = a(input_ids=ids[:, 8:], memory_state=state, write=False, return_stats=True).logits
    assert torch.allclose(got, want, atol=1e-5) and torch.allclose(got, explicit, atol=1e-5)
    assert (got - bare).abs().max() > 1e-3


def test_detach_gives_the_attention_implementation_back():
    base = tiny_gemma3(layers=4)
    ids = torch.randint(3, 64, (1, 9))
    ref = base(input_ids=ids).logits
    mm = _trained(base)
    mm(input_ids=ids)
    mm.detach()
    assert base.config._attn_implementation == "sdpa" and hook_count(base) == 0
    assert not any(hasattr(m, "_gma6_site") for m in base.modules())
    assert torch.equal(base(input_ids=ids).logits, ref)


def test_an_implementation_changed_after_attach_is_an_error_not_a_silent_bare_answer():
    base = tiny_gemma3(layers=4)
    mm = _trained(base)
    base.config._attn_implementation = "sdpa"  # what set_attn_implementation would do
    with pytest.raises(RuntimeError, match="attention implementation was changed"):
        mm(input_ids=torch.randint(3, 64, (1, 9)))
    base.config._attn_implementation = "gma6_sdpa"
    mm(input_ids=torch.randint(3, 64, (1, 9)))  # and it reads again once restored


@pytest.mark.parametrize("read_query", ["before_norm", "after_norm"])
def test_a_query_adapter_reads_through_the_attention_function(read_query):
    """A query adapter on the fast path equals the hooks' fused read on an eager base and the explicit read of the
    statistics; left padding (positions that are not 0..T-1) included. after_norm: the base's finished queries plus
    the adapter's change, rotated alone; before_norm: the q projection's output plus the change, normed and rotated
    again. The two kinds with the same weights differ."""
    ids = torch.randint(3, 64, (2, 14), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, :3] = False
    sdpa = tiny_gemma3(layers=4).float()
    eager = tiny_gemma3(layers=4).float()
    eager.config._attn_implementation = "eager"
    a, b = _trained(sdpa, read_rank=2, read_query=read_query), _trained(eager, read_rank=2, read_query=read_query)
    assert a._sites is not None and b._sites is None
    assert all(m.read_q.up.weight.abs().sum() > 0 for m in a.controller.layers)
    with torch.no_grad():
        state = a(input_ids=ids[:, :8], attention_mask=mask[:, :8]).memory_state
        got = a(input_ids=ids[:, 8:], memory_state=state, write=False).logits
        want = b(input_ids=ids[:, 8:], memory_state=state, write=False).logits
        explicit = a(input_ids=ids[:, 8:], memory_state=state, write=False, return_stats=True).logits
        padded = a(input_ids=ids, attention_mask=mask, memory_state=state, write=False).logits
        padded_eager = b(input_ids=ids, attention_mask=mask, memory_state=state, write=False).logits
    assert torch.allclose(got, want, atol=1e-5) and torch.allclose(got, explicit, atol=1e-5)
    assert torch.allclose(padded[mask], padded_eager[mask], atol=1e-5)
    other_query = "before_norm" if read_query == "after_norm" else "after_norm"
    other = _trained(tiny_gemma3(layers=4).float(), read_rank=2, read_query=other_query)
    other.controller.load_state_dict(a.controller.state_dict())
    with torch.no_grad():
        differs = other(input_ids=ids[:, 8:], memory_state=state, write=False).logits
    assert (differs - got).abs().max() > 1e-3


def test_read_query_none_adapts_only_the_slots():
    """read_query="none": key and value adapters (once a segment, on the slots), no query adapter; its read equals the
    hooks' on an eager base and the explicit read, and differs from the same adapter without its key and value changes."""
    ids = torch.randint(3, 64, (2, 14), generator=torch.Generator().manual_seed(1))
    sdpa, eager = tiny_gemma3(layers=4).float(), tiny_gemma3(layers=4).float()
    eager.config._attn_implementation = "eager"
    a, b = _trained(sdpa, read_rank=2, read_query="none"), _trained(eager, read_rank=2, read_query="none")
    assert all(m.read_q is None and m.read_k is not None and m.read_v is not None for m in a.controller.layers)
    assert not any(".read_q." in n for n in a.controller.state_dict())
    with torch.no_grad():
        state = a(input_ids=ids[:, :8]).memory_state
        got = a(input_ids=ids[:, 8:], memory_state=state, write=False).logits
        want = b(input_ids=ids[:, 8:], memory_state=state, write=False).logits
        explicit = a(input_ids=ids[:, 8:], memory_state=state, write=False, return_stats=True).logits
        for m in a.controller.layers:
            m.read_k.up.weight.zero_()
            m.read_v.up.weight.zero_()
        plain = a(input_ids=ids[:, 8:], memory_state=state, write=False).logits
    assert torch.allclose(got, want, atol=1e-5) and torch.allclose(got, explicit, atol=1e-5)
    assert (plain - got).abs().max() > 1e-4


def test_read_query_is_checked():
    with pytest.raises(ValueError, match="read_query='within'"):
        _config(read_rank=2, read_query="within")
    with pytest.raises(ValueError, match="needs read_rank > 0"):
        _config(read_query="after_norm")


def test_gradients_and_checkpointing_through_the_attention_function():
    """Memory gradients equal with and without the base's gradient checkpointing (the site runs again in
    the recomputation), and equal the hook path's."""
    ids = torch.randint(3, 64, (2, 16), generator=torch.Generator().manual_seed(2))
    for kind in ({}, {"read_rank": 2}, {"read_rank": 2, "read_query": "after_norm"}, {"read_rank": 2, "read_query": "none"}):
        _grads_agree(ids, kind)


def _grads_agree(ids, kind):
    grads = []
    for impl, ckpt in (("sdpa", False), ("sdpa", True), ("eager", False)):
        base = tiny_gemma3(layers=4).float()
        base.config._attn_implementation = impl
        mm = _trained(base, gradient_checkpointing=ckpt, **kind)
        mm.train()
        state = mm(input_ids=ids[:, :8]).memory_state
        mm(input_ids=ids[:, 8:], memory_state=state, labels=ids[:, 8:]).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in mm.controller.parameters() if p.grad is not None]))
        assert (mm._sites is not None) == (impl == "sdpa")
    assert grads[0].abs().max() > 0
    for g in grads[1:]:
        assert torch.allclose(grads[0], g, atol=1e-5)


def test_under_checkpointing_a_segment_holds_no_slots_or_hidden_states_until_backward():
    """Under the base's checkpointing a segment's call lives until backward (the recomputed layers hold it): after
    its forward it holds neither every layer's slots prepared at once (made again, values only, when its layers are
    recomputed: ``SlotsAgain``; keys and values once per key-value head, not repeated over the query groups) nor
    normed hidden states for the write (which norms the layers' outputs, kept by the checkpoints anyway, in its own
    recomputation), and autograd saves nothing the memory's code computed outside a recomputation. Without
    checkpointing the call keeps both, which autograd needs there. The gradients are the same either way
    (``_grads_agree``)."""
    from gma6.memory.base_read import SlotsAgain
    import traceback

    from torch.autograd.graph import saved_tensors_hooks

    from gma6.model import _CALL_KWARG

    ids = torch.randint(3, 64, (2, 16), generator=torch.Generator().manual_seed(4))
    held, saved = {}, {}
    for ckpt in (False, True):
        mm = _trained(tiny_gemma3(layers=4).float(), gradient_checkpointing=ckpt, read_rank=2)
        assert mm._stacked is not None and mm._stacked.applies()
        mm.train()
        calls, where = [], []

        def pack(t):
            stack = traceback.extract_stack()[:-1]
            frames = [f for f in stack if "/torch/" not in f.filename.replace("\\", "/")]
            inputs = any(f.name == "save_inputs" for f in stack)  # a checkpoint keeping its inputs
            # activations have batch, token or slot, and width dimensions (a stacked gate (L, H) is a weight's size)
            if frames and "/gma6/" in frames[-1].filename.replace("\\", "/") and t.dim() >= 3 and not inputs:
                where.append(f"{frames[-1].filename}:{frames[-1].lineno} {tuple(t.shape)}")
            return t

        handle = mm._hooked_layers[-1].register_forward_pre_hook(
            lambda m, a, kw: calls.append(kw.get(_CALL_KWARG)), with_kwargs=True)
        try:
            with saved_tensors_hooks(pack, lambda t: t):
                out = mm(input_ids=ids, memory_state=mm.init_state(2), labels=ids)
        finally:
            handle.remove()
        call = calls[0]
        again = isinstance(call.site_slots, SlotsAgain)
        held[ckpt] = (again and call.site_slots.held or not again and call.site_slots is not None, len(call.hiddens))
        saved[ckpt] = where
        if again:
            made = []
            call.site_slots._make = (lambda make: lambda: made.append(make()) or made[-1])(call.site_slots._make)
        out.loss.backward()
        if again:  # made once, for all layers, in the first recomputed layer; none held after
            assert len(made) == 1 and len(made[0]) == 3 and not call.site_slots.held
            assert made[0][0][0].shape[1] == mm.base.config.num_key_value_heads
    assert mm.base.config.num_attention_heads > mm.base.config.num_key_value_heads
    assert held[False] == (True, 3) and held[True] == (False, 0)
    assert saved[True] == [], saved[True]


@pytest.mark.parametrize("kind", [{}, {"read_rank": 2}, {"read_rank": 2, "read_query": "after_norm"},
                                  {"read_rank": 2, "read_query": "none"}])
def test_generate_reads_through_the_attention_function(kind):
    base = tiny_gemma3(layers=4)
    ids = torch.randint(3, 64, (2, 10), generator=torch.Generator().manual_seed(3))
    mm = _trained(base, **kind)
    assert mm._sites is not None
    state = mm(input_ids=ids).memory_state
    out = mm.generate(ids[:, :4], memory_state=state, max_new_tokens=5, do_sample=False)
    bare = base.generate(ids[:, :4], attention_mask=torch.ones_like(ids[:, :4]), max_new_tokens=5, do_sample=False)
    # one step at a time equals the greedy decode with the full forward each step
    seq = ids[:, :4]
    for _ in range(5):
        logits = mm(input_ids=seq, memory_state=state, write=False).logits[:, -1]
        seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq) and not torch.equal(out, bare)


def test_unsupported_implementations():
    assert supported("sdpa") and not supported("eager") and not supported("gma6_sdpa") and not supported(None)
    base = tiny_gemma3(layers=4)
    base.config._attn_implementation = "eager"
    with pytest.raises(ValueError, match="cannot carry the read"):
        AttentionSites({base.model.layers[1].self_attn: lambda q, o, k: o})
    assert base.config._attn_implementation == "eager"


@pytest.mark.parametrize("kind", [{}, {"read_rank": 2}, {"read_rank": 2, "read_query": "after_norm"},
                                  {"read_rank": 2, "read_query": "none"}])
@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gemma2"])
def test_other_families_read_through_their_attention_function(family, kind):
    """Llama, Qwen2 and Mistral (no q/k norms, their own RoPE tables) read through the attention function and agree
    with the explicit read; Gemma 2's logit softcapping (which SDPA lacks) keeps the hooks."""
    from test_families import _family

    base = _family(family).float().eval()
    if family != "gemma2":  # transformers' SDPA refuses Gemma 2's softcap; it keeps its default (eager)
        base.config._attn_implementation = "sdpa"
    impl = base.config._attn_implementation
    ids = torch.randint(3, 64, (2, 16), generator=torch.Generator().manual_seed(4))
    torch.manual_seed(5)
    mm = attach_memory(base, _config(layers=[0, 1], **kind))
    perturb(mm)
    try:
        assert (mm._sites is not None) == (family != "gemma2")
        with torch.no_grad():
            state = mm(input_ids=ids[:, :8]).memory_state
            fast = mm(input_ids=ids[:, 8:], memory_state=state, write=False).logits
            explicit = mm(input_ids=ids[:, 8:], memory_state=state, write=False, return_stats=True).logits
            bare = base(input_ids=ids[:, 8:]).logits
        assert torch.allclose(fast, explicit, atol=1e-5) and (fast - bare).abs().max() > 1e-4
    finally:
        mm.detach()
    assert base.config._attn_implementation == impl and hook_count(base) == 0


@pytest.mark.parametrize("kind", [{}, {"read_rank": 2}, {"read_rank": 2, "read_query": "after_norm"},
                                  {"read_rank": 2, "read_query": "none"}, {"read_site": "residual"}])
def test_persistent_slots_are_read_by_every_path_trained_and_saved(tmp_path, kind):
    """persistent_slots: learned slots before the written ones. A fresh memory's outputs are the bare base's (gate 0);
    trained, even an empty memory reads them, the same through the attention function, the hooks (eager base) and
    the explicit read; gradients reach them and their logit bias; they round-trip through save and load."""
    import gma6

    ids = torch.randint(3, 64, (2, 14), generator=torch.Generator().manual_seed(0))
    sdpa, eager = tiny_gemma3(layers=4).float(), tiny_gemma3(layers=4).float()
    eager.config._attn_implementation = "eager"
    bare = sdpa(input_ids=ids).logits
    torch.manual_seed(5)
    fresh = attach_memory(sdpa, _config(persistent_slots=3, **kind))
    assert fresh.controller.persistent.shape == (3, 3, sdpa.config.hidden_size)
    with torch.no_grad():
        assert torch.allclose(fresh(input_ids=ids).logits, bare, atol=1e-6)
    fresh.detach()
    a = _trained(sdpa, persistent_slots=3, **kind)
    b = _trained(eager, persistent_slots=3, **kind)
    with torch.no_grad():
        empty = a(input_ids=ids, write=False).logits  # nothing written: only the persistent slots to read
        assert (empty - bare).abs().max() > 1e-3
        state = a(input_ids=ids[:, :8]).memory_state
        got = a(input_ids=ids[:, 8:], memory_state=state, write=False).logits
        explicit = a(input_ids=ids[:, 8:], memory_state=state, write=False, return_stats=True).logits
        want = b(input_ids=ids[:, 8:], memory_state=state, write=False).logits
    assert torch.allclose(got, want, atol=1e-5) and torch.allclose(got, explicit, atol=1e-5)
    a(input_ids=ids[:, 8:], memory_state=state, labels=ids[:, 8:]).loss.backward()
    assert a.controller.persistent.grad.abs().sum() > 0 and a.controller.persistent_logit.grad.abs().sum() > 0
    a.save_pretrained(tmp_path / "p")
    a.detach()
    c = gma6.load_adapter(sdpa, tmp_path / "p")
    with torch.no_grad():
        assert torch.allclose(c(input_ids=ids[:, 8:], memory_state=state, write=False).logits, got, atol=1e-6)


@pytest.mark.parametrize("kind", [{}, {"read_site": "residual"}])
def test_persistent_slots_read_only_when_answering(kind):
    """persistent_reads="answer": a read that writes (a document being read) never sees the persistent slots, so its
    logits and written memory are those of the same weights without them; a read without a write and generate do
    see them, and only those give their parameters gradients."""
    ids = torch.randint(3, 64, (2, 14), generator=torch.Generator().manual_seed(0))
    base = tiny_gemma3(layers=4).float()
    a = _trained(base, persistent_slots=3, persistent_reads="answer", **kind)
    with torch.no_grad():
        a.controller.persistent_logit.fill_(2.0)  # read strongly, so that where they are read it shows
        sd = {k: v.clone() for k, v in a.controller.state_dict().items()}
        out = a(input_ids=ids[:, :8])
        answered = a(input_ids=ids[:, 8:], memory_state=out.memory_state, write=False).logits
        a.config.persistent_reads = "always"  # the same weights, read at every read
        always = a(input_ids=ids[:, :8])
        a.config.persistent_reads = "answer"
    a.detach()
    b = _trained(base, **kind)  # the same seed: the same weights, without persistent slots
    b.controller.load_state_dict({k: v for k, v in sd.items() if not k.startswith("persistent")})
    with torch.no_grad():
        plain = b(input_ids=ids[:, :8])
        assert torch.allclose(out.logits, plain.logits, atol=1e-6)
        assert torch.allclose(out.memory_state.memory, plain.memory_state.memory, atol=1e-6)
        assert (always.logits - plain.logits).abs().max() > 1e-3
        unsteered = b(input_ids=ids[:, 8:], memory_state=plain.memory_state, write=False).logits
    assert (answered - unsteered).abs().max() > 1e-3
    b.detach()
    a = _trained(base, persistent_slots=3, persistent_reads="answer", **kind)
    a.controller.load_state_dict(sd)
    a(input_ids=ids[:, :8], labels=ids[:, :8]).loss.backward()
    assert a.controller.persistent.grad is None or a.controller.persistent.grad.abs().sum() == 0
    state = a(input_ids=ids[:, :8]).memory_state
    a(input_ids=ids[:, 8:], memory_state=state, write=False, labels=ids[:, 8:]).loss.backward()
    assert a.controller.persistent.grad.abs().sum() > 0 and a.controller.persistent_logit.grad.abs().sum() > 0
    with torch.no_grad():
        gen = a.generate(ids[:1, 8:], memory_state=state.select(torch.tensor([0])), max_new_tokens=3, do_sample=False)
        a.controller.persistent_logit.fill_(-1e4)  # not read at all
        off = a.generate(ids[:1, 8:], memory_state=state.select(torch.tensor([0])), max_new_tokens=3, do_sample=False,
                         output_logits=True, return_dict_in_generate=True)
        a.controller.persistent_logit.fill_(2.0)
        on = a.generate(ids[:1, 8:], memory_state=state.select(torch.tensor([0])), max_new_tokens=3, do_sample=False,
                        output_logits=True, return_dict_in_generate=True)
    assert gen.shape == (1, 9) and (on.logits[0] - off.logits[0]).abs().max() > 1e-3
    a.detach()


def test_persistent_slots_are_checked():
    with pytest.raises(ValueError, match="persistent_reads='sometimes'"):
        _config(persistent_slots=2, persistent_reads="sometimes")
    with pytest.raises(ValueError, match="persistent_slots=-1"):
        _config(persistent_slots=-1)
    with pytest.raises(ValueError, match="needs read_rule='base'"):
        GMA6Config(persistent_slots=2)


def test_cuda_graph_read_is_eager_off_cuda_and_needs_the_attention_function():
    """cuda_graph_read: replays only on CUDA (memory/graphed.py, checked by scripts/gpu_graph_read_check.py on a GPU);
    on the CPU the read is the eager one, the same logits, no graph captured, the slots not staged. Refused where the
    read does not run in the attention function."""
    ids = torch.randint(3, 64, (2, 14), generator=torch.Generator().manual_seed(7))
    eager = _trained(tiny_gemma3(layers=4).float(), read_rank=2)
    graphed = _trained(tiny_gemma3(layers=4).float(), read_rank=2, cuda_graph_read=True)
    assert graphed._graphed is not None and eager._graphed is None
    with torch.no_grad():
        want = eager(input_ids=ids[:, 8:], memory_state=eager.read(ids[:, :8], segment_length=4)).logits
        got = graphed(input_ids=ids[:, 8:], memory_state=graphed.read(ids[:, :8], segment_length=4)).logits
    assert torch.equal(got, want) and not graphed._graphed._graphs and graphed._graphed._slots is None
    base = tiny_gemma3(layers=4)
    base.config._attn_implementation = "eager"
    with pytest.raises(ValueError, match="cuda_graph_read=True .* attention implementation"):
        attach_memory(base, _config(cuda_graph_read=True))
    assert hook_count(base) == 0


def test_a_training_segments_call_is_freed_without_the_cyclic_collector():
    """A segment's call (which holds the segment's slots, outputs and memory) is freed by reference counting once
    its step's backward is done: a reference cycle through it would keep every step's calls until Python's cyclic
    collector ran (GPU memory growing across training steps)."""
    import gc
    import weakref

    from gma6.model import _CALL_KWARG

    ids = torch.randint(3, 64, (2, 16), generator=torch.Generator().manual_seed(5))
    for ckpt in (False, True):
        mm = _trained(tiny_gemma3(layers=4).float(), gradient_checkpointing=ckpt, read_rank=2)
        mm.train()
        refs = []
        handle = mm._hooked_layers[-1].register_forward_pre_hook(
            lambda m, a, kw: refs.append(weakref.ref(kw.get(_CALL_KWARG))), with_kwargs=True)
        gc.collect()
        gc.disable()
        try:
            state = mm(input_ids=ids[:, :8]).memory_state
            loss = mm(input_ids=ids[:, 8:], memory_state=state, labels=ids[:, 8:]).loss
            loss.backward()
            del state, loss
            alive = [r() is not None for r in refs]
        finally:
            gc.enable()
            handle.remove()
        assert len(refs) >= 2 and not any(alive), (ckpt, alive)


@pytest.mark.parametrize("ckpt", [False, True])
def test_training_with_stacks_and_casts_kept_for_the_step_gives_the_gradients_of_making_them_afresh(ckpt, monkeypatch):
    """The memory's stacked and cast weights are made once a training step (``derived`` under autograd): over three
    segments, with and without the base's checkpointing, the gradients equal those of making them at every use,
    each over two forwards and backwards without an optimizer step (gradient accumulation: the first backward frees
    what was kept, and the second makes it again)."""
    import gma6.memory.attention as attention

    ids = torch.randint(3, 64, (2, 24), generator=torch.Generator().manual_seed(6))

    def grads() -> torch.Tensor:
        mm.zero_grad(set_to_none=True)
        for _ in range(2):
            state = mm.init_state(2)
            loss = 0.0
            for s in range(0, 24, 8):
                out = mm(input_ids=ids[:, s:s + 8], memory_state=state, labels=ids[:, s:s + 8])
                state, loss = out.memory_state, loss + out.loss
            loss.backward()
        return torch.cat([p.grad.flatten() for p in mm.controller.parameters() if p.grad is not None])

    mm = _trained(tiny_gemma3(layers=4).float(), gradient_checkpointing=ckpt, read_rank=2)
    mm.train()
    kept = grads()
    monkeypatch.setattr(attention, "_kept_until_backward", lambda cache, name, params, make: make())
    fresh = grads()
    assert kept.abs().max() > 0 and torch.allclose(kept, fresh, atol=1e-6)


def test_the_checkpointed_write_norms_each_layer_in_one_fused_kernel_as_the_base_would():
    """Under the base's checkpointing the write norms the memory layers' outputs itself: where a reading norm folds
    into an RMSNorm (Gemma's ``1 + w``), as one fused rms_norm with its gain — the same state as each layer's own
    norm module within fp32 rounding."""
    torch.manual_seed(7)
    base = tiny_gemma3(layers=4).float()
    with torch.no_grad():  # gains of their own (before attaching: the base is frozen while attached)
        for layer in base.model.layers:
            layer.input_layernorm.weight.add_(0.5 * torch.randn_like(layer.input_layernorm.weight))
    mm = _trained(base, gradient_checkpointing=True, read_rank=2)
    assert all(isinstance(e, float) for e in mm._fold_eps) and len(mm._reading_norms) > 1
    h = mm.base.config.hidden_size
    outputs = [torch.randn(2, 8, h) * (i + 1) for i in range(len(mm._reading_norms))]
    mask = torch.ones(2, 8, dtype=torch.bool)
    state = mm.init_state(2)
    fused, _ = mm._write_outputs(state, outputs, mask, True)
    eps, mm._fold_eps = mm._fold_eps, [None] * len(mm._fold_eps)  # each by its own module
    try:
        own, _ = mm._write_outputs(state, outputs, mask, True)
    finally:
        mm._fold_eps = eps
    assert torch.allclose(fused.memory, own.memory, atol=1e-5) and torch.equal(fused.usage > 0, own.usage > 0)
    assert torch.allclose(fused.usage, own.usage, atol=1e-5)
