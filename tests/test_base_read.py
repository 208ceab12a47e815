"""read_rule="base": slots of the base's own hidden states, read through the next layer's attention."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_gemma3

from gma6 import GMA6Config
from gma6.integration import hook_count
from gma6.memory.base_read import BaseAttentionRead, add_read, find_rotary, log_usage, slots_sdpa
from gma6.model import MemoryModel, attach_memory


def _config(**kw) -> GMA6Config:
    args = dict(num_slots=6, memory_dim=None, layers=[0, 2], write_rule="tokens", tokens_per_segment=3,
                read_rule="base", token_retention="priority", usage_decay=0.99)
    args.update(kw)
    return GMA6Config(**args)


SITES = ("residual", "attention")


def _open_gates(mm: MemoryModel, value: float = 1.0) -> None:
    with torch.no_grad():
        for layer in mm.controller.layers:
            layer.base_gate.fill_(value)


def _layer_read(s: int = 5, t: int = 7):
    """A tiny Gemma 3's layer 1, its ``BaseAttentionRead`` and random slots (2, s, H) and segment view (2, t, H)."""
    torch.manual_seed(0)
    base = tiny_gemma3(layers=4).float()
    layer = base.model.layers[1]
    hidden = base.config.hidden_size
    return layer, BaseAttentionRead(layer, find_rotary(base)), torch.randn(2, s, hidden), torch.randn(2, t, hidden)


def test_the_read_is_the_next_layers_own_attention_over_the_slots():
    """With a shut sink and equal usage, the read is what layer i+1's attention (its projections,
    norms, RoPE with the slots just before the segment, its output norm) gives when the segment may
    attend to the slots alone."""
    layer, read, slots, view = _layer_read()
    s, t, hidden = slots.shape[1], view.shape[1], slots.shape[2]
    gate = torch.full((hidden,), 30.0)  # tanh = 1
    got, stats = read(view, slots, torch.zeros(2, s), None, gate, torch.tensor(-1e9), return_stats=True)
    assert torch.allclose(stats["read_sink"], torch.zeros(2), atol=1e-6) and torch.allclose(stats["output_gate"], torch.ones(2))

    x = torch.cat([slots, view], 1)
    pos = torch.arange(s + t)[None]
    cos, sin = read.rotary(x, pos, layer.self_attn.layer_type)  # the base's rotary module
    mask = torch.full((1, 1, s + t, s + t), float("-inf"))
    mask[..., :s] = 0.0
    out, _ = layer.self_attn(hidden_states=x, position_embeddings=(cos, sin), attention_mask=mask)
    want = layer.post_attention_layernorm(out[:, s:])
    assert torch.allclose(got, want, atol=1e-5)


def test_the_read_inside_the_attention_is_the_residual_reads_before_its_o_projection():
    """``in_attention`` takes the q projection the layer computed and gives the read before the o
    projection: through the o projection and the output norm, the residual site's read (whose
    equality to the layer's own attention over the slots is tested above)."""
    layer, read, slots, view = _layer_read()
    s, t, hidden = slots.shape[1], view.shape[1], slots.shape[2]
    usage, sink = torch.randn(2, s), torch.tensor(0.3)
    want, _ = read(view, slots, usage, None, torch.full((hidden,), 30.0), sink)
    kv = read.slot_keys_values(slots, view.dtype)
    inside, stats = read.in_attention(layer.self_attn.q_proj(view), view, kv, usage, None,
                                      torch.full((read.width,), 30.0), sink, return_stats=True)
    assert inside.shape == (2, t, read.width) and read.width == layer.self_attn.q_proj.out_features
    assert torch.allclose(layer.post_attention_layernorm(layer.self_attn.o_proj(inside)), want, atol=1e-5)
    assert 0 < float(stats["read_sink"].min()) < 1


def test_a_query_change_after_the_norm_is_added_to_the_normed_queries_and_rotated_with_them():
    """``query_after_norm``: the read's queries are ``RoPE(qnorm(W_q x) + A x)`` in every path: the residual read,
    the read inside the attention (through the o projection and output norm equal to it) and the fused read."""
    from gma6.memory.layer import LowRank

    layer, read, slots, view = _layer_read()
    after = BaseAttentionRead(layer, read.rotary, query_after_norm=True)
    s, t, hidden = slots.shape[1], view.shape[1], slots.shape[2]
    usage, sink = torch.randn(2, s), torch.tensor(0.3)
    qa = LowRank(hidden, 2, read.width)
    torch.nn.init.normal_(qa.up.weight, std=0.3)
    gate = torch.full((hidden,), 30.0)
    with torch.no_grad():
        got, _ = after(view, slots, usage, None, gate, sink, q_adapter=qa)
        # by hand: the change added after the q-norm, before RoPE
        q = read.queries(layer.self_attn.q_proj(view), None, s)
        pos = torch.arange(t)[None] + s
        cos, sin = read.rotary(view, pos, layer.self_attn.layer_type)
        change = qa(view).view(2, t, -1, read.head_dim).transpose(1, 2)
        change = change * cos[:, None] + torch.cat([-change[..., change.shape[-1] // 2:],
                                                    change[..., : change.shape[-1] // 2]], -1) * sin[:, None]
        k, v = read.slot_keys_values(slots, view.dtype)
        by_hand, _ = read.attend(q + change, k, v, usage, sink)
        want = layer.post_attention_layernorm(layer.self_attn.o_proj(by_hand))
        before, _ = read(view, slots, usage, None, gate, sink, q_adapter=qa)
        inside, _ = after.in_attention(layer.self_attn.q_proj(view), view, (k, v), usage, None,
                                       torch.full((read.width,), 30.0), sink, q_adapter=qa)
        fused = after.fused_read(layer.self_attn.q_proj(view), view, after.prepare_slots(slots, usage, sink, view.dtype),
                                 None, qa)
    assert torch.allclose(got, want, atol=1e-5) and (before - got).abs().max() > 1e-3
    assert torch.allclose(layer.post_attention_layernorm(layer.self_attn.o_proj(inside)), want, atol=1e-5)
    assert torch.allclose(add_read(torch.zeros_like(inside), fused, torch.ones(read.width)), inside, atol=1e-5)


def test_the_base_rotation_tables_are_cached_only_for_the_same_tensors():
    """``rotation_tables`` (the after-norm query change's RoPE): a cache shared by two forwards never hands the first's
    tables to the second, even where the second's tensors are equal in shape (or reuse the first's memory)."""
    layer, read, _, view = _layer_read()
    q = torch.randn(2, 4, view.shape[1], read.head_dim)
    cache: dict = {}
    tables = []
    for start in (0, 5):
        pos = torch.arange(start, start + view.shape[1])[None]
        cos, sin = read.rotary(view, pos, layer.self_attn.layer_type)
        got = read.rotation_tables(q, (cos, sin), None, cache)
        assert read.rotation_tables(q, (cos, sin), None, cache) is got  # the same tensors: cached
        want = read._cos_signed_sin(q, pos, None, ())
        assert all(torch.allclose(a, b) for a, b in zip(got, want))
        tables.append(got)
    assert not torch.allclose(tables[0][0], tables[1][0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_fused_read_equals_the_explicit_one(dtype):
    """``prepare_slots`` + ``fused_read`` (one SDPA call, the sink as a zero key and value, grouped queries
    unrepeated, the folded q_norm and the roll form of RoPE) give ``in_attention``'s read: with empty
    slots, positions after a left pad, and the memory's own query/key/value adapters."""
    from gma6.memory.layer import LowRank

    torch.manual_seed(0)
    base = tiny_gemma3(layers=4).to(dtype)
    layer = base.model.layers[2]
    read = BaseAttentionRead(layer, find_rotary(base))
    assert read.fusable and read.groups == 2 and read._q_fold is not None and read._k_fold is not None
    s, t, hidden = 5, 7, base.config.hidden_size
    slots, view = torch.randn(2, s, hidden, dtype=dtype), torch.randn(2, t, hidden, dtype=dtype)
    usage = torch.randn(2, s)
    usage[1, :2] = float("-inf")  # never written
    positions = torch.stack([torch.arange(t), (torch.arange(t) - 2).clamp(min=0)])
    gate, sink = torch.randn(read.width), torch.tensor(0.4)
    qa, ka, va = LowRank(hidden, 2, read.width), LowRank(hidden, 2), LowRank(hidden, 2)
    for m in (qa, ka, va):
        torch.nn.init.normal_(m.up.weight, std=0.3)
    q = layer.self_attn.q_proj(view)
    with torch.no_grad():
        want, _ = read.in_attention(q, view, read.slot_keys_values(slots, dtype, ka, None, va), usage, positions, gate, sink,
                                    q_adapter=qa)
        fused = read.fused_read(q, view, read.prepare_slots(slots, usage, sink, dtype, ka, va), positions, qa)
        got = add_read(torch.zeros_like(want), fused, torch.tanh(gate))
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert got.dtype == dtype and torch.allclose(got.float(), want.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("rank", [0, 2])
def test_every_layers_slots_prepared_at_once_equal_each_layers_own(rank):
    """``StackedSlots`` (one batched matmul for every layer's k and v, one norm, RoPE tables of both layer
    types stacked) gives each layer's ``prepare_slots``; the model's logits are the same either way; a LoRA on
    v_proj makes the model prepare layer by layer."""
    torch.manual_seed(0)
    base = tiny_gemma3(layers=5).float()
    mm = attach_memory(base, _config(layers=[0, 1, 2, 3], read_site="attention", read_rank=rank))
    assert {r.layer_type for r in mm._base_reads} == {"sliding_attention", "full_attention"}
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in mm.controller.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    ids = torch.randint(3, 64, (2, 12), generator=g)
    state = mm(input_ids=ids).memory_state
    memory, usage = state.memory, log_usage(state.usage)
    layers = mm.controller.layers
    adapters = (lambda name: [getattr(m, name) for m in layers]) if rank else (lambda name: None)
    with torch.no_grad():
        stacked = mm._stacked.prepare(memory, usage, torch.stack([m.sink for m in layers]), torch.float32,
                                      adapters("read_k"), adapters("read_v"), {})
        for i, (read, m) in enumerate(zip(mm._base_reads, layers)):
            want = list(read.prepare_slots(memory[:, i], usage[:, i], m.sink, torch.float32, m.read_k, m.read_v))
            # stacked, the keys and values come repeated over the query groups already (see slots_sdpa)
            want[:2] = [x.repeat_interleave(read.groups, dim=1) for x in want[:2]]
            for a, b in zip(stacked[i], want):
                assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5)
        # stage (cuda_graph_read's fixed buffers): every layer's slots read from where it puts them, the same values
        kept: list[torch.Tensor] = []
        staged = mm._stacked.prepare(memory, usage, torch.stack([m.sink for m in layers]), torch.float32,
                                     adapters("read_k"), adapters("read_v"), {},
                                     stage=lambda *t: kept.extend(x.clone() for x in t) or tuple(kept))
        for i in range(len(layers)):
            for j, (a, b) in enumerate(zip(staged[i], stacked[i])):
                assert torch.equal(a, b) and a.untyped_storage().data_ptr() == kept[j].untyped_storage().data_ptr()
        assert mm._stacked.applies()
        fast = mm(input_ids=ids, memory_state=state, write=False).logits
        applies, mm._stacked.applies = mm._stacked.applies, lambda: False
        try:
            slow = mm(input_ids=ids, memory_state=state, write=False).logits
        finally:
            mm._stacked.applies = applies
    assert torch.allclose(fast, slow, atol=1e-5) and (fast - mm.base(input_ids=ids).logits).abs().max() > 1e-3
    mm.add_lora(2, targets=["v_proj"])
    assert not mm._stacked.applies()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("slots", [6, 7, 8])
def test_every_layers_stacked_mask_starts_16_byte_aligned(dtype, slots):
    """Each layer's mask is a view into one stacked tensor; CUDA's memory-efficient SDPA needs it aligned
    (at batch 1 and 129 entries a row, every other layer's view was not: "misaligned address")."""
    base = tiny_gemma3(layers=5).to(dtype)
    mm = attach_memory(base, _config(layers=[0, 1, 2, 3], read_site="attention", num_slots=slots))
    layers = mm.controller.layers
    memory = torch.randn(1, 4, slots, base.config.hidden_size)
    usage = torch.randn(1, 4, slots)
    with torch.no_grad():
        prepared = mm._stacked.prepare(memory, usage, torch.stack([m.sink for m in layers]), dtype, cache={})
        for i, (read, m) in enumerate(zip(mm._base_reads, layers)):
            k, v, mask = prepared[i]
            assert mask.data_ptr() % 16 == 0 and mask.shape == (1, 1, 1, slots + 1)
            want = read.prepare_slots(memory[:, i], usage[:, i], m.sink, dtype)[2]
            assert torch.equal(mask, want)


def test_the_attention_site_adds_its_read_before_the_next_layers_o_projection(tiny_model):
    """Memory layer 0's read enters layer 1's attention: layer 0's output is the bare one, and
    layer 1's o projection gets the bare input plus the gated read."""
    ids = torch.randint(3, 64, (2, 9))
    mm = attach_memory(tiny_model, _config(read_site="attention", layers=[0]))
    _open_gates(mm, 0.5)
    state = mm(input_ids=ids).memory_state
    seen: dict[str, list[torch.Tensor]] = {"out0": [], "o_in": [], "q": []}
    layers = tiny_model.model.layers
    hooks = [layers[0].register_forward_hook(lambda m, a, o: seen["out0"].append(o[0] if isinstance(o, tuple) else o)),
             layers[1].self_attn.o_proj.register_forward_pre_hook(lambda m, a: seen["o_in"].append(a[0])),
             layers[1].self_attn.q_proj.register_forward_hook(lambda m, a, o: seen["q"].append((a[0], o)))]
    try:
        with torch.no_grad():
            mm(input_ids=ids, memory_state=state, write=False)
            with mm.memory_disabled():
                mm(input_ids=ids, write=False)
    finally:
        for h in hooks:
            h.remove()
    assert torch.equal(seen["out0"][0], seen["out0"][1])  # nothing added to the residual stream
    read, layer = mm._base_reads[0], mm.controller.layers[0]
    (view, q), _ = seen["q"]
    from gma6.memory.base_read import log_usage as lu
    with torch.no_grad():
        delta, _ = read.in_attention(q, view, read.slot_keys_values(state.memory[:, 0], q.dtype), lu(state.usage[:, 0]),
                                     None, layer.base_gate, layer.sink)
    assert delta.abs().max() > 1e-3
    assert torch.allclose(seen["o_in"][0], seen["o_in"][1] + delta, atol=1e-6)
    mm.detach()
    assert hook_count(tiny_model) == 0 and not mm._site and not mm._site_read


@pytest.mark.parametrize("site", SITES)
def test_outputs_unchanged_at_init_and_an_empty_memory_reads_nothing(tiny_model, site):
    ids = torch.randint(3, 64, (2, 9))
    ref = tiny_model(input_ids=ids).logits
    mm = attach_memory(tiny_model, _config(read_site=site))
    out = mm(input_ids=ids)
    assert torch.allclose(out.logits, ref, atol=1e-6)
    _open_gates(mm)
    # a fresh memory has no written slot: only the sink is read, whatever the gate
    fresh = mm(input_ids=ids, return_stats=True)
    assert torch.allclose(fresh.logits, ref, atol=1e-6)
    assert all(torch.allclose(st["read_sink"], torch.ones(2)) for st in fresh.stats)
    assert {"input_gate", "forget_gate", "output_gate", "usage", "age", "write_attention"} <= set(fresh.stats[0])
    # after a segment is written, the same gates change the outputs
    changed = mm(input_ids=ids, memory_state=out.memory_state).logits
    assert (changed - ref).abs().max() > 1e-3
    mm.detach()
    assert hook_count(tiny_model) == 0
    assert torch.allclose(tiny_model(input_ids=ids).logits, ref)


def test_priority_retention_keeps_the_highest_gates_in_reading_order(tiny_model):
    mm = attach_memory(tiny_model, _config(num_slots=4, tokens_per_segment=2, layers=[0]))
    layer = mm.controller.layers[0]
    hidden = tiny_model.config.hidden_size
    with torch.no_grad():  # score = the first hidden unit of the (normed) state: we choose the winners
        layer.score.weight.zero_()
        layer.score.weight[0, 0] = 1.0
        layer.score.bias.zero_()
        layer.norm_h.weight.fill_(1.0)
    memory, usage, age = torch.zeros(1, 4, hidden), torch.zeros(1, 4), torch.zeros(1, 4)
    mask = torch.ones(1, 5, dtype=torch.bool)
    tags = []
    for step, firsts in enumerate([[5, 4, -9, -9, -9], [-9, 0.5, -9, 3, -9], [-9, -9, 4.5, -9, -9.5]]):
        h = torch.randn(1, 5, hidden) * 0.01
        h[0, :, 0] = torch.tensor(firsts) * 0.5
        h[0, :, 1] = torch.arange(5) + 10 * step  # a tag to find each token again
        memory, usage, age, _ = layer.write_tokens(memory, h, mask, usage, age, 2, 0.99)
        tags.append(h[0, :, 1])
    kept = memory[0, :, 1].round().tolist()
    # picks: (0, 1), (3, 1), (2, 0); the 4 highest decayed gates: 0, 1 of step 0, 3 of step 1, 2 of step 2
    assert kept == [0.0, 1.0, 13.0, 22.0]
    assert torch.all(usage[0] > 0) and torch.equal(age[0], torch.tensor([2.0, 2.0, 1.0, 0.0]))


@pytest.mark.parametrize("site", SITES)
def test_gradients_reach_the_gate_sink_and_scorer_and_round_trip(tiny_model, tmp_path, site):
    ids = torch.randint(3, 64, (2, 9))
    mm = attach_memory(tiny_model, _config(read_site=site))
    _open_gates(mm, 0.5)
    state = mm(input_ids=ids).memory_state
    out = mm(input_ids=ids, memory_state=state, write_targets=ids > 30)
    (out.logits.float().square().mean() + out.write_loss).backward()
    for name, p in mm.controller.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert not mm.controller.initial_memory.requires_grad  # never read (usage 0): not trained, not a parameter to fit
    mm.save_pretrained(tmp_path)
    again = MemoryModel.from_pretrained(tiny_gemma3(), tmp_path)
    with torch.no_grad():
        a = mm(input_ids=ids, memory_state=state).logits
        b = again(input_ids=ids, memory_state=state).logits
    assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("site", SITES)
def test_the_selection_loss_is_the_scores_cross_entropy_against_the_targets(tiny_model, site):
    mm = attach_memory(tiny_model, _config(read_site=site))
    ids = torch.randint(3, 64, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 6:] = False
    targets = ids > 30
    out = mm(input_ids=ids, attention_mask=mask.long(), write_targets=targets)
    # the same from the hidden states the write saw: each reading norm's last output in a forward
    # (the base's input to the next layer, after the memory's read was added)
    seen: dict[int, torch.Tensor] = {}
    hooks = [tiny_model.model.layers[i + 1].input_layernorm.register_forward_hook(
        lambda m, a, o, i=i: seen.__setitem__(i, o)) for i in (0, 2)]
    try:
        mm(input_ids=ids, attention_mask=mask.long(), write=False)
    finally:
        for h in hooks:
            h.remove()
    want = torch.stack([
        torch.nn.functional.binary_cross_entropy_with_logits(layer.selection_logits(seen[i])[mask], targets[mask].float())
        for layer, i in zip(mm.controller.layers, (0, 2))]).mean()
    assert torch.allclose(out.write_loss, want, atol=1e-5)


@pytest.mark.parametrize("kw, match", [
    ({"write_rule": "slots", "token_retention": "recent"}, "write_rule='tokens'"),
    ({"read_site": "mlp"}, "read_site"),
    ({"read_rule": "memory", "write_rule": "slots", "token_retention": "recent", "memory_dim": 16, "num_heads": 2,
      "read_site": "attention"}, "read_site='attention' places the base read"),
    ({"read_rule": "nope"}, "read_rule"),
    ({"token_retention": "oldest"}, "token_retention"),
])
def test_bad_configs_name_the_problem(kw, match):
    with pytest.raises(ValueError, match=match):
        _config(**kw)


@pytest.mark.parametrize("kw, match", [
    ({"memory_dim": 16, "num_heads": 2}, "memory_dim must be None"),
    ({"layers": [0, 3]}, "next layer"),
])
def test_model_dependent_errors_name_the_problem(tiny_model, kw, match):
    with pytest.raises(ValueError, match=match):
        attach_memory(tiny_model, _config(**kw))
    assert hook_count(tiny_model) == 0


def test_write_targets_need_the_tokens_write_and_the_right_shape(tiny_model):
    ids = torch.randint(3, 64, (2, 9))
    mm = attach_memory(tiny_model, _config())
    with pytest.raises(ValueError, match="shape"):
        mm(input_ids=ids, write_targets=torch.ones(2, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="write=True"):
        mm(input_ids=ids, write=False, write_targets=ids > 0)
    mm.detach()
    slots = attach_memory(tiny_model, GMA6Config(num_slots=4, memory_dim=16, num_heads=2, layers=[0]))
    with pytest.raises(ValueError, match="write_rule='tokens'"):
        slots(input_ids=ids, write_targets=ids > 0)


def test_log_usage_masks_empty_slots_without_nan_gradients():
    usage = torch.tensor([0.0, 0.5, 1.0], requires_grad=True)
    out = log_usage(usage)
    assert out[0] == float("-inf") and torch.allclose(out[1:], torch.log(torch.tensor([0.5, 1.0])))
    torch.softmax(torch.cat([out, torch.zeros(1)]), 0)[1].backward()
    assert torch.isfinite(usage.grad).all() and usage.grad[0] == 0


@pytest.mark.parametrize("site", SITES)
def test_the_read_adapter_starts_as_a_no_op_trains_and_never_touches_the_bases_own_attention(tiny_model, site):
    ids = torch.randint(3, 64, (2, 9))
    ref = tiny_model(input_ids=ids).logits
    plain = attach_memory(tiny_model, _config(read_site=site))
    _open_gates(plain, 0.5)
    state = plain(input_ids=ids).memory_state
    want = plain(input_ids=ids, memory_state=state).logits
    weights = plain.controller.state_dict()
    plain.detach()
    mm = attach_memory(tiny_model, _config(read_rank=2, read_site=site))
    mm.controller.load_state_dict(weights, strict=False)
    got = mm(input_ids=ids, memory_state=state)
    assert torch.allclose(got.logits, want, atol=1e-6)  # the adapter's up projection starts at zero
    got.logits.float().square().mean().backward()
    ups = [getattr(m, f"read_{x}").up.weight.grad for m in mm.controller.layers for x in "qkv"]
    assert all(g is not None and g.abs().sum() > 0 for g in ups)
    with torch.no_grad():
        for m in mm.controller.layers:
            for x in "qkv":
                getattr(m, f"read_{x}").up.weight.normal_()
        assert not torch.allclose(mm(input_ids=ids, memory_state=state).logits, want, atol=1e-4)
        # with nothing written, the read adapter has nothing to change: the base's own attention is untouched
        assert torch.allclose(mm(input_ids=ids).logits, ref, atol=1e-6)
    n = sum(p.numel() for p in mm.memory_parameters()) - sum(p.numel() for p in weights.values())
    hidden = tiny_model.config.hidden_size
    # the query's change goes to the q projection's output read inside the attention (heads x head width)
    q_out = hidden if site == "residual" else mm._base_reads[0].width
    assert n == 2 * 2 * 2 * (hidden + hidden) + 2 * 2 * (hidden + q_out)  # 2 layers x (k, v; q) x (down + up) at rank 2


def test_read_rank_needs_the_base_read():
    with pytest.raises(ValueError, match="read_rule='base'"):
        GMA6Config(read_rank=4)
    with pytest.raises(ValueError, match="read_rank"):
        _config(read_rank=-1)


def _trained_pair(site: str = "residual", **options_on):
    """The same tiny base and base-read memory twice, the memory's gates open: plain, and with ``options_on``."""
    plain = attach_memory(tiny_gemma3(), _config(read_rank=2, read_site=site))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in plain.controller.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    other = attach_memory(tiny_gemma3(), _config(read_rank=2, read_site=site, **options_on))
    other.controller.load_state_dict(plain.controller.state_dict())
    return plain, other


@pytest.mark.parametrize("site", SITES)
def test_the_base_read_under_offload_half_precision_and_checkpointing(site):
    ids = torch.randint(3, 64, (2, 24), generator=torch.Generator().manual_seed(1))
    plain, off = _trained_pair(site, offload_to_cpu=True)
    with torch.no_grad():
        a = plain(input_ids=ids[:, 12:], memory_state=plain.read(ids[:, :12], segment_length=6)).logits
        b = off(input_ids=ids[:, 12:], memory_state=off.read(ids[:, :12], segment_length=6)).logits
    assert torch.allclose(a, b, atol=1e-6)

    plain, half = _trained_pair(site, use_half_precision=True)
    assert half.base.get_input_embeddings().weight.dtype in (torch.bfloat16, torch.float16)
    with torch.no_grad():
        h = half(input_ids=ids[:, 12:], memory_state=half.read(ids[:, :12], segment_length=6)).logits.float()
    assert torch.isfinite(h).all() and (h - a).abs().max() < 0.1 * a.abs().max()

    def grads(mm):
        mm.train()
        state = mm(input_ids=ids[:, :12]).memory_state
        mm(input_ids=ids[:, 12:], memory_state=state, labels=ids[:, 12:]).loss.backward()
        return {n: p.grad.clone() for n, p in mm.controller.named_parameters() if p.grad is not None}

    plain, ck = _trained_pair(site, gradient_checkpointing=True)
    assert all(getattr(m, "gradient_checkpointing", False) for m in ck._hooked_layers)
    ref, got = grads(plain), grads(ck)
    assert ref.keys() == got.keys() and len(ref) > 0
    for name in ref:
        assert torch.allclose(ref[name], got[name], atol=1e-5), name


@pytest.mark.parametrize("site", SITES)
def test_the_base_read_on_a_4bit_base(tmp_path, site):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    import gma6.options as options

    # every projection 32-wide or more: bitsandbytes packs CPU weights in blocks of 32 rows where the CPU has
    # AVX512-BF16 and then refuses narrower ones (a 16-wide k/v projection)
    tiny_gemma3(hidden=64, head_dim=32).save_pretrained(tmp_path)
    base = AutoModelForCausalLM.from_pretrained(tmp_path, **options.quantized_load_kwargs(device="cpu"))
    options.keep_4bit_differentiable(base)  # what attaching does; the reference below must use the same kernel
    ids = torch.randint(3, 64, (2, 16))
    with torch.no_grad():
        ref = base(input_ids=ids).logits
    mm = attach_memory(base, _config(use_4bit_quantization=True, read_rank=2, read_site=site))
    with torch.no_grad():
        assert torch.equal(mm(input_ids=ids).logits, ref)
        _open_gates(mm)
    state = mm(input_ids=ids).memory_state
    out = mm(input_ids=ids, memory_state=state, labels=ids)
    out.loss.backward()
    assert all(p.grad is None for p in mm.base.parameters())
    assert mm.controller.layers[0].base_gate.grad is not None


@pytest.mark.parametrize("site", SITES)
def test_generate_with_the_base_read_matches_greedy_forwards(tiny_model, site):
    """generate() keeps one call object for every decoding step: the rotary tables must follow each step's positions."""
    mm = attach_memory(tiny_model, _config(read_rank=2, read_site=site))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in mm.controller.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    state = mm.read(torch.randint(3, 64, (1, 24), generator=g), segment_length=8)
    prompt = torch.randint(3, 64, (1, 5), generator=g)
    out = mm.generate(prompt, memory_state=state, max_new_tokens=5, do_sample=False)
    ids = prompt
    with torch.no_grad():
        for _ in range(5):
            logits = mm(input_ids=ids, memory_state=state, write=False).logits
            ids = torch.cat([ids, logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, ids)


def test_the_shared_rotary_tables_equal_per_layer_ones(tiny_model):
    """The tables a forward shares among its memory layers give the same read as computing them per layer."""
    ids = torch.randint(3, 64, (2, 12))
    mm = attach_memory(tiny_model, _config())
    _open_gates(mm, 0.7)
    state = mm(input_ids=ids).memory_state
    with torch.no_grad():
        shared = mm(input_ids=ids, memory_state=state).logits
        read = mm._base_reads[0]
        calls = []
        original = read._cos_sin
        read._cos_sin = lambda like, pos, cache, key: calls.append(key) or original(like, pos, None, key)
        try:
            alone = mm(input_ids=ids, memory_state=state).logits
        finally:
            read._cos_sin = original
    assert calls and torch.allclose(shared, alone, atol=1e-6)


def test_the_folded_input_norm_equals_calling_the_bases(tiny_model):
    ids = torch.randint(3, 64, (2, 12))
    mm = attach_memory(tiny_model, _config())
    _open_gates(mm, 0.7)
    state = mm(input_ids=ids).memory_state
    assert all(g is not None for g in mm._reading_gains)  # Gemma's RMSNorm folds
    with torch.no_grad():
        folded = mm(input_ids=ids, memory_state=state).logits
        gains, mm._reading_gains = mm._reading_gains, [None] * len(mm._reading_gains)
        try:
            called = mm(input_ids=ids, memory_state=state).logits
        finally:
            mm._reading_gains = gains
    assert torch.allclose(folded, called, atol=1e-5)


def test_the_read_adapter_keeps_no_fp32_copy_of_a_half_precision_input():
    """The memory's low-rank read adapters (fp32 weights) on a bf16 base's hidden states: computed in bf16, so
    backward keeps the bf16 input itself, not an fp32 copy of every token (2.7 GiB a step on the H200)."""
    from torch.autograd.graph import saved_tensors_hooks

    from gma6.memory.layer import LowRank

    torch.manual_seed(0)
    lr = LowRank(64, 4)
    with torch.no_grad():
        lr.up.weight.normal_()
    x = torch.randn(2, 8, 64, dtype=torch.bfloat16, requires_grad=True)
    saved = []
    with saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = lr(x)
    assert y.dtype == torch.bfloat16
    assert not any(t.dtype == torch.float32 and t.shape[:-1] == x.shape[:-1] for t in saved)
    y.float().sum().backward()
    assert lr.down.weight.grad is not None and lr.up.weight.grad.dtype == torch.float32
    ref = lr.up(lr.down(x.detach().float()))
    assert torch.allclose(y.float(), ref, atol=0.05, rtol=0.05)


def test_the_read_adapters_cast_is_kept_without_autograd_until_the_weight_changes():
    from gma6.memory.layer import LowRank

    torch.manual_seed(0)
    lr = LowRank(16, 2)
    torch.nn.init.normal_(lr.up.weight)
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    with torch.no_grad():
        first = lr(x)
        assert lr._weight(lr.up, torch.bfloat16) is lr._weight(lr.up, torch.bfloat16)  # cached
        lr.up.weight.mul_(2)  # an optimizer step or a load_state_dict
        second = lr(x)
    assert torch.allclose(second.float(), 2 * first.float(), rtol=2e-2, atol=1e-2)
    y = lr(x)  # with autograd: cast afresh, gradients reach the fp32 weights
    y.float().sum().backward()
    assert lr.up.weight.grad is not None and torch.equal(y, second)


def test_the_read_adapters_made_under_inference_mode_read_a_half_precision_input():
    """``evaluate`` loads the adapter under ``torch.inference_mode``: its weights are inference tensors (no version
    counter). A bf16 read through them must work (it raised on the GPU, 2026-11-27) and follow a change in place."""
    from gma6.memory.layer import LowRank

    torch.manual_seed(0)
    with torch.inference_mode():
        lr = LowRank(16, 2)
        torch.nn.init.normal_(lr.up.weight)
        x = torch.randn(3, 16, dtype=torch.bfloat16)
        first = lr(x)
        assert lr.up.weight.is_inference() and first.dtype == torch.bfloat16
        assert torch.allclose(first.float(), lr.up(lr.down(x.float())), rtol=2e-2, atol=1e-2)
        lr.up.weight.mul_(2)
        assert torch.allclose(lr(x).float(), 2 * first.float(), rtol=2e-2, atol=1e-2)


def test_the_fused_read_with_grouped_keys_equals_sdpa_with_enable_gqa():
    """The read folds the query heads into the tokens over one key-value head, or repeats the slots' keys over the
    query groups over several (a fused kernel takes either with a mask); the result equals PyTorch's own
    grouped-query attention, gradients of the queries, keys, values and mask included, and comes out laid as the
    attention's output (B, T, n, d) where it folded."""
    layer, read, slots, view = _layer_read()
    assert read.groups > 1
    torch.manual_seed(1)
    b, n, t, d = 2, read.attn.config.num_attention_heads, 7, read.head_dim
    for kv_heads in (1, 2):
        q = torch.randn(b, t, n, d).transpose(1, 2).requires_grad_()  # as the base's projection lays its queries
        k = torch.randn(b, kv_heads, 6, d, requires_grad=True)
        v = torch.randn(b, kv_heads, 6, d, requires_grad=True)
        mask = torch.randn(b, 1, 1, 6, requires_grad=True)
        got = slots_sdpa(q, k, v, mask, read.scaling)
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=read.scaling,
                                                               enable_gqa=True)
        assert got.shape == ref.shape and torch.allclose(got, ref, atol=1e-6)
        if kv_heads == 1:
            assert got.transpose(1, 2).is_contiguous()
        g1 = torch.autograd.grad(got.square().sum(), (q, k, v, mask))
        g2 = torch.autograd.grad(ref.square().sum(), (q, k, v, mask))
        for a, c in zip(g1, g2):
            assert torch.allclose(a, c, atol=1e-5)


# the attention function's site with a query adapter before the q-norm, none, or one after it
@pytest.mark.parametrize("read_rank,read_query", [(2, "before_norm"), (0, "before_norm"), (2, "after_norm")])
def test_the_attention_site_read_is_recomputed_in_backward_with_equal_gradients(read_rank, read_query):
    """In training the read inside the attention and the write keep only their inputs and recompute the rest in
    backward: the gradients equal those of a step that keeps everything, and backward keeps fewer bytes."""
    from torch.autograd.graph import saved_tensors_hooks

    g = torch.Generator().manual_seed(0)
    mm = attach_memory(tiny_gemma3(), _config(read_rank=read_rank, read_site="attention", read_query=read_query))
    assert mm._sites is not None
    with torch.no_grad():
        for p in mm.controller.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    ids = torch.randint(3, 64, (2, 24))

    def step() -> tuple[dict[str, torch.Tensor], int]:
        seen: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        mm.zero_grad(set_to_none=True)
        with saved_tensors_hooks(pack, lambda t: t):
            state = mm(input_ids=ids[:, :12]).memory_state
            loss = mm(input_ids=ids[:, 12:], memory_state=state, labels=ids[:, 12:]).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in mm.controller.named_parameters() if p.grad is not None}
        return grads, sum(seen.values())

    recomputed, lean = step()
    kept = MemoryModel._recomputed
    try:  # the read kept whole; the write (outside the layers) still recomputed
        MemoryModel._recomputed = lambda self, fn, *args, in_layer=True: (
            fn(*args) if in_layer else kept(self, fn, *args, in_layer=in_layer))
        ref, full = step()
    finally:
        MemoryModel._recomputed = kept
    # the write too: with no checkpoint at all, more bytes again and the same gradients
    import torch.utils.checkpoint as ckpt

    real = ckpt.checkpoint
    try:
        ckpt.checkpoint = lambda fn, *args, use_reentrant=None, **kw: fn(*args, **kw)
        MemoryModel._recomputed = lambda self, fn, *args, in_layer=True: fn(*args)
        none, everything = step()
    finally:
        ckpt.checkpoint = real
        MemoryModel._recomputed = kept
    assert full < everything
    for name in ref:
        assert torch.allclose(none[name], recomputed[name], atol=1e-6), name
    assert ref.keys() == recomputed.keys() and len(ref) > 0
    for name in ref:
        assert torch.allclose(ref[name], recomputed[name], atol=1e-6), name
    assert lean < full


def test_the_slots_read_under_autograd_matches_sdpa_in_half_precision():
    """Under autograd the read is spelt out (scores and softmax in fp32); in bf16 it stays as close to an fp32 SDPA
    as the fused kernel is, forward and gradients, and without autograd it is SDPA's own result."""
    torch.manual_seed(2)
    b, n, t, d, s = 2, 4, 9, 32, 5
    q32 = torch.randn(b, t, n, d).transpose(1, 2)
    k32, v32 = torch.randn(b, 1, s, d), torch.randn(b, 1, s, d)
    mask32 = torch.randn(b, 1, 1, s)
    ref = torch.nn.functional.scaled_dot_product_attention(q32, k32, v32, attn_mask=mask32, scale=0.2, enable_gqa=True)
    leaves = [x.to(torch.bfloat16).requires_grad_() for x in (q32, k32, v32, mask32)]
    got = slots_sdpa(*leaves, 0.2)
    assert got.dtype == torch.bfloat16 and got.shape == ref.shape
    assert (got.float() - ref).abs().max() < 0.03
    ref_leaves = [x.clone().requires_grad_() for x in (q32, k32, v32, mask32)]
    ref = torch.nn.functional.scaled_dot_product_attention(*ref_leaves[:3], attn_mask=ref_leaves[3], scale=0.2,
                                                           enable_gqa=True)
    grads = torch.autograd.grad(got.float().square().sum(), leaves)
    ref_grads = torch.autograd.grad(ref.square().sum(), ref_leaves)
    for g, r in zip(grads, ref_grads):
        assert g.dtype == torch.bfloat16 and (g.float() - r).norm() / r.norm() < 0.02
    with torch.no_grad():
        plain = slots_sdpa(*[x.detach() for x in leaves], 0.2)
        fused = torch.nn.functional.scaled_dot_product_attention(
            leaves[0].detach().transpose(1, 2).reshape(b, 1, t * n, d), leaves[1].detach(), leaves[2].detach(),
            attn_mask=leaves[3].detach(), scale=0.2)
    assert torch.equal(plain, fused.view(b, t, n, d).transpose(1, 2))
