"""MemoryModel on a tiny Gemma 3: unchanged at init, explicit state, padding, save/load, detach."""

from __future__ import annotations

import contextlib

import pytest
import torch

import gma6
from gma6 import GMA6Config, MemoryModel, attach_memory
from gma6.integration import hook_count

from conftest import perturb as _perturb
from conftest import tiny_gemma3

SMALL = dict(num_slots=4, memory_dim=16, num_heads=2)


def test_fresh_memory_leaves_logits_unchanged(tiny_model):
    x = torch.randint(3, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    ref = tiny_model(input_ids=x).logits
    mm = attach_memory(tiny_model, GMA6Config(**SMALL))
    state = mm.init_state(2)
    for _ in range(3):  # also after writes: the zero output projection hides whatever is in memory
        out = mm(input_ids=x, memory_state=state)
        assert (out.logits - ref).abs().max().item() <= 1e-5
        state = out.memory_state
    assert state.segments_read == 3


def test_memory_changes_outputs_once_trained(tiny_model):
    x = torch.randint(3, 64, (1, 12), generator=torch.Generator().manual_seed(1))
    ref = tiny_model(input_ids=x).logits
    mm = attach_memory(tiny_model, GMA6Config(**SMALL))
    _perturb(mm)
    assert (mm(input_ids=x).logits - ref).abs().max().item() > 1e-3
    with mm.memory_disabled():
        assert torch.equal(mm(input_ids=x).logits, ref)


def test_default_layers_spread_over_depth():
    mm = attach_memory(tiny_gemma3(layers=8), GMA6Config(num_memory_layers=3, **SMALL))
    assert mm.config.layers == [1, 4, 7]


def test_only_memory_parameters_train(tiny_model):
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    mm = attach_memory(tiny_model, GMA6Config(**SMALL))
    trainable = {id(p) for p in mm.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in mm.controller.parameters()}
    opt = torch.optim.AdamW([p for p in mm.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randint(3, 64, (2, 8))
    for _ in range(3):
        state = mm.init_state(2)
        for _ in range(2):
            out = mm(input_ids=x, labels=x, memory_state=state)
            state = out.memory_state
        out.loss.backward()
        assert all(p.grad is None for p in tiny_model.parameters())
        opt.step()
        opt.zero_grad()
    for k, v in tiny_model.state_dict().items():
        assert torch.equal(v, before[k]), k
    changed = [n for n, p in mm.controller.named_parameters()]
    assert changed


def test_read_equals_manual_stepping(tiny_model):
    mm = attach_memory(tiny_model, GMA6Config(**SMALL))
    _perturb(mm)
    x = torch.randint(3, 64, (2, 29), generator=torch.Generator().manual_seed(2))
    state = mm.read(x, segment_length=8)
    manual = mm.init_state(2)
    with torch.no_grad():
        for s in range(0, 29, 8):
            manual = mm(input_ids=x[:, s : s + 8], memory_state=manual).memory_state
    assert state.segments_read == manual.segments_read == 4
    torch.testing.assert_close(state.memory, manual.memory, rtol=0, atol=1e-6)
    torch.testing.assert_close(state.usage, manual.usage, rtol=0, atol=1e-6)
    assert torch.equal(state.age, manual.age)
    assert state.tokens_read.tolist() == [29, 29]


def test_samples_do_not_interact_and_padding_matches_alone(tiny_model):
    mm = attach_memory(tiny_model, GMA6Config(**SMALL))
    _perturb(mm)
    g = torch.Generator().manual_seed(3)
    a, b = torch.randint(3, 64, (1, 21), generator=g), torch.randint(3, 64, (1, 13), generator=g)
    alone_a, alone_b = mm.read(a, segment_length=8), mm.read(b, segment_length=8)
    # sample 1 padded on the left, as tokenizers for generation do
    ids = torch.zeros(2, 21, dtype=torch.long)
    mask = torch.zeros(2, 21, dtype=torch.long)
    ids[0], mask[0] = a[0], 1
    ids[1, 8:], mask[1, 8:] = b[0], 1
    batch = mm.read(ids, segment_length=8, attention_mask=mask)
    torch.testing.assert_close(batch.memory[0], alone_a.memory[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(batch.memory[1], alone_b.memory[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(batch.usage[1], alone_b.usage[0], rtol=0, atol=1e-5)
    assert batch.tokens_read.tolist() == [21, 13]
    # changing sample 1 leaves sample 0 alone
    ids2 = ids.clone()
    ids2[1, 8:] = torch.randint(3, 64, (13,), generator=g)
    other = mm.read(ids2, segment_length=8, attention_mask=mask)
    torch.testing.assert_close(other.memory[0], batch.memory[0], rtol=0, atol=1e-6)
    assert not torch.allclose(other.memory[1], batch.memory[1])


def test_padded_forward_logits_match_alone(tiny_model):
    mm = attach_memory(tiny_model, GMA6Config(**SMALL))
    _perturb(mm)
    g = torch.Generator().manual_seed(4)
    a, b = torch.randint(3, 64, (1, 10), generator=g), torch.randint(3, 64, (1, 6), generator=g)
    state = mm.read(torch.randint(3, 64, (2, 16), generator=g), segment_length=8)
    ids = torch.zeros(2, 10, dtype=torch.long)
    mask = torch.zeros(2, 10, dtype=torch.long)
    ids[0], mask[0] = a[0], 1
    ids[1, :6], mask[1, :6] = b[0], 1
    out = mm(input_ids=ids, attention_mask=mask, memory_state=state)
    alone = mm(input_ids=b, memory_state=state.select([1]))
    torch.testing.assert_close(out.logits[1, :6], alone.logits[0], rtol=0, atol=1e-4)
    torch.testing.assert_close(out.memory_state.memory[1], alone.memory_state.memory[0], rtol=0, atol=1e-5)


def test_save_load_gives_identical_logits(tiny_model, tmp_path):
    mm = attach_memory(tiny_model, GMA6Config(**SMALL))
    _perturb(mm)
    x = torch.randint(3, 64, (2, 16))
    state = mm.read(x, segment_length=8)
    ref = mm(input_ids=x, memory_state=state).logits
    mm.save_pretrained(tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["gma6_config.json", "memory_adapter.safetensors"]
    base = mm.detach()
    loaded = MemoryModel.from_pretrained(base, tmp_path / "adapter")
    state2 = loaded.read(x, segment_length=8)
    assert torch.equal(loaded(input_ids=x, memory_state=state2).logits, ref)


def test_state_snapshot_round_trips(tiny_model, tmp_path):
    mm = attach_memory(tiny_model, GMA6Config(**SMALL))
    _perturb(mm)
    state = mm.read(torch.randint(3, 64, (2, 20)), segment_length=8)
    gma6.save_state(state, tmp_path / "s.gma6")
    back = gma6.load_state(tmp_path / "s.gma6")
    for name in ("memory", "usage", "age", "tokens_read"):
        assert torch.equal(getattr(back, name), getattr(state, name)), name
    assert back.segments_read == state.segments_read


def test_detach_leaves_no_hook_and_restores_base(tiny_model):
    x = torch.randint(3, 64, (1, 8))
    ref = tiny_model(input_ids=x).logits
    flags = {n: p.requires_grad for n, p in tiny_model.named_parameters()}
    n_hooks = hook_count(tiny_model)
    mm = attach_memory(tiny_model, GMA6Config(**SMALL))
    _perturb(mm)
    # one on each memory layer, one on the base norm that reads its output (the write's input)
    assert hook_count(tiny_model) == n_hooks + 2 * len(mm.config.layers)
    base = mm.detach()
    assert base is tiny_model
    assert hook_count(base) == n_hooks
    assert {n: p.requires_grad for n, p in base.named_parameters()} == flags
    assert torch.equal(base(input_ids=x).logits, ref)
    with pytest.raises(RuntimeError, match="detached"):
        mm(input_ids=x)


def test_a_second_memory_on_an_attached_base_is_refused_until_detach(tiny_model):
    """Two memories on one base would both fire on every call; refused with a clear error, the first left working.
    A failed attach leaves the base free."""
    from gma6.rmt import RMTMemoryModel

    x = torch.randint(3, 64, (1, 8))
    first = attach_memory(tiny_model, GMA6Config(**SMALL))
    _perturb(first)
    ref = first(input_ids=x).logits
    n_hooks = hook_count(tiny_model)
    for config in (GMA6Config(**SMALL), GMA6Config(memory_type="rmt", num_slots=4)):
        with pytest.raises(RuntimeError, match="already has a MemoryModel attached.*detach"):
            attach_memory(tiny_model, config)
    assert hook_count(tiny_model) == n_hooks and torch.equal(first(input_ids=x).logits, ref)
    base = first.detach()
    with pytest.raises(ValueError):  # layer 9 is beyond the tiny model's 4
        attach_memory(base, GMA6Config(**SMALL, layers=[9]))
    second = attach_memory(base, GMA6Config(memory_type="rmt", num_slots=4))
    assert isinstance(second, RMTMemoryModel)
    second.detach()
    attach_memory(base, GMA6Config(**SMALL)).detach()


def test_detach_switches_off_the_checkpointing_the_memory_switched_on():
    from gma6.options import set_gradient_checkpointing

    base = tiny_gemma3()
    on = lambda m: any(getattr(x, "gradient_checkpointing", False) for x in m.modules())  # noqa: E731
    mm = attach_memory(base, GMA6Config(**SMALL, gradient_checkpointing=True))
    assert on(base)
    assert mm.detach() is base and not on(base) and hook_count(base) == 0
    set_gradient_checkpointing(base, True)  # the user's own stays on
    attach_memory(base, GMA6Config(**SMALL, gradient_checkpointing=True)).detach()
    assert on(base)


def test_generate_reads_memory_and_matches_forward(tiny_model):
    mm = attach_memory(tiny_model, GMA6Config(**SMALL))
    _perturb(mm)
    g = torch.Generator().manual_seed(5)
    state = mm.read(torch.randint(3, 64, (1, 24), generator=g), segment_length=8)
    prompt = torch.randint(3, 64, (1, 5), generator=g)
    out = mm.generate(prompt, memory_state=state, max_new_tokens=4, do_sample=False)
    # greedy decoding by hand, with the memory read-only and no cache
    ids = prompt
    for _ in range(4):
        logits = mm(input_ids=ids, memory_state=state, write=False).logits
        ids = torch.cat([ids, logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, ids)
    with mm.memory_disabled():
        bare = mm.generate(prompt, memory_state=state, max_new_tokens=4, do_sample=False)
    assert torch.equal(bare, tiny_model.generate(prompt, max_new_tokens=4, do_sample=False))


def test_print_trainable_parameters(tiny_model, capsys):
    mm = attach_memory(tiny_model, GMA6Config(**SMALL))
    mm.print_trainable_parameters()
    line = capsys.readouterr().out
    trainable, total = mm.get_nb_trainable_parameters()
    assert line.startswith(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%:")
    assert trainable == sum(p.numel() for p in mm.controller.parameters())


def test_narrow_memory_width_and_more_slots_than_width(tiny_model):
    mm = attach_memory(tiny_model, GMA6Config(num_slots=24, memory_dim=8, num_heads=2, layers=[1, 3]))
    assert mm.controller.shape == (2, 24, 8)
    out = mm(input_ids=torch.randint(3, 64, (1, 8)))
    assert torch.isfinite(out.memory_state.memory).all()


def test_stats_report_gates_usage_and_age(tiny_model):
    mm = attach_memory(tiny_model, GMA6Config(addressing="content+usage", **SMALL))
    out = mm(input_ids=torch.randint(3, 64, (2, 8)), return_stats=True)
    assert len(out.stats) == len(mm.config.layers)
    st = out.stats[0]
    # forget bias 3 → sigmoid(3) ≈ 0.95 at initialisation
    assert 0.9 < float(st["forget_gate"].mean()) < 1.0
    assert st["usage"].shape == (2, 4) and st["age"].shape == (2, 4)
    assert 0 <= float(st["output_gate"].mean()) <= 1
    torch.testing.assert_close(st["write_attention"].sum(-1), torch.ones(2, 4))


def test_split_segments_with_bos_prefix():
    from gma6.model import split_segments

    ids = torch.tensor([[1, 5, 6, 7, 8, 9, 10], [0, 0, 1, 5, 6, 7, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 0]])
    segs = split_segments(ids, mask, 4, bos_token_id=1)
    real = [(s[0] * s[1]).tolist() for s in segs]  # padding ids are arbitrary
    assert real == [[[1, 5, 6, 7], [1, 5, 6, 7]], [[1, 8, 9, 10], [0, 0, 0, 0]]]
    assert [s[1].tolist() for s in segs] == [[[1, 1, 1, 1], [1, 1, 1, 1]], [[1, 1, 1, 1], [0, 0, 0, 0]]]


def test_cut_segments_knows_the_full_segments_and_needs_no_mask_without_padding():
    """``cut_segments`` learns each row's count of real tokens once and tells the full segments from it: the same
    flags as each segment's own mask says, with and without a BOS; without a mask it cuts as an all-ones mask does."""
    from gma6.model import cut_segments, split_segments

    g = torch.Generator().manual_seed(3)
    ids = torch.randint(2, 50, (3, 11), generator=g)
    ids[:, 0] = 1
    for mask in (torch.ones(3, 11, dtype=torch.bool), torch.tensor([[1] * 11, [0, 0] + [1] * 9, [1] * 5 + [0] * 6]),
                 torch.tensor([[1] * 11, [1, 0] * 5 + [1], [0] * 11])):
        for bos in (None, 1):
            segs, full = cut_segments(ids, mask, 4, bos)
            assert full == [bool(m.all()) for _, m in segs]
            plain = split_segments(ids, mask, 4, bos)
            assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(segs, plain))
    for bos in (None, 1):
        with_mask = cut_segments(ids, torch.ones(3, 11, dtype=torch.bool), 4, bos)
        without = cut_segments(ids, None, 4, bos)
        assert with_mask[1] == without[1] and len(with_mask[0]) == len(without[0])
        assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(with_mask[0], without[0]))
    assert cut_segments(ids, None, 4)[1] == [True, True, True]  # 11 tokens: 4 + 4 + 3, all real
    for trial in range(30):  # random padding anywhere: each row cut as it would be alone, the flags its masks'
        mask = torch.rand(3, 11, generator=g) < (0.3 + 0.02 * trial)
        for bos in (None, 1):
            segs, full = cut_segments(ids, mask, 3, bos)
            assert full == [bool(m.all()) for _, m in segs]
            for row in range(3):
                alone = [s[0][0][s[1][0]] for s in cut_segments(ids[row:row + 1], mask[row:row + 1], 3, bos)[0]]
                together = [s[0][row][s[1][row]] for s in segs]
                assert all(torch.equal(a, b) for a, b in zip(alone, together))
                assert all(t.numel() == 0 for t in together[len(alone):])  # segments only longer rows fill: empty here


def test_left_padded_forward_matches_alone(tiny_model):
    mm = attach_memory(tiny_model, GMA6Config(**SMALL))
    _perturb(mm)
    b = torch.randint(3, 64, (1, 6), generator=torch.Generator().manual_seed(6))
    ids = torch.zeros(2, 9, dtype=torch.long)
    mask = torch.zeros(2, 9, dtype=torch.long)
    ids[0], mask[0] = torch.randint(3, 64, (9,)), 1
    ids[1, 3:], mask[1, 3:] = b[0], 1
    out = mm(input_ids=ids, attention_mask=mask)
    alone = mm(input_ids=b)
    torch.testing.assert_close(out.logits[1, 3:], alone.logits[0], rtol=0, atol=1e-4)


def test_write_takes_its_input_from_the_base_norm_call_and_equals_recomputing_it(tiny_model):
    mm = attach_memory(tiny_model, GMA6Config(**SMALL))
    _perturb(mm)
    x = torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(5))
    calls = []
    spies = [n.register_forward_hook(lambda *a: calls.append(1)) for n in mm._reading_norms]
    try:
        with torch.no_grad():
            captured = mm(input_ids=x).memory_state
            n_captured = len(calls)
            for handle in mm._norm_hooks:  # without the capture the write norms the outputs itself
                handle.remove()
            calls.clear()
            recomputed = mm(input_ids=x).memory_state
    finally:
        for s in spies:
            s.remove()
    assert n_captured == len(mm.config.layers)  # the base's own calls only: the write added none
    assert len(calls) == 2 * len(mm.config.layers)
    assert torch.equal(captured.memory, recomputed.memory)


def test_folded_reading_norm_equals_calling_it(tiny_model):
    """rms_norm(norm(h)) is computed as rms_norm(h * g): same read, fewer kernels."""
    with torch.no_grad():
        for layer in tiny_model.model.layers:  # non-trivial norm weights
            layer.input_layernorm.weight.normal_()
    mm = attach_memory(tiny_model, GMA6Config(**SMALL))
    _perturb(mm)
    assert all(g is not None for g in mm._reading_gains)
    x = torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        folded = mm(input_ids=x)
        mm._reading_gains = [None] * len(mm._reading_gains)
        called = mm(input_ids=x)
    torch.testing.assert_close(folded.logits, called.logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(folded.memory_state.memory, called.memory_state.memory, rtol=1e-4, atol=1e-4)


def test_half_precision_read_computes_in_the_base_dtype_and_is_as_close_to_fp32():
    """A bf16 base reads in bf16 at inference (no casts of the stream); training keeps fp32 maths.
    Measured against the same model in fp32, the bf16 read errs no more than the fp32 read does
    on the same bf16 base (the base's own rounding dominates both)."""
    x = torch.randint(3, 64, (2, 8), generator=torch.Generator().manual_seed(7))

    def run(dtype: torch.dtype, grad: bool):
        mm = attach_memory(tiny_gemma3().to(torch.bfloat16).to(dtype), GMA6Config(**SMALL))
        _perturb(mm)
        with torch.set_grad_enabled(grad):
            out = mm(input_ids=x)
        return mm, out.logits.detach().float(), out.memory_state.memory.detach()

    _, *ref = run(torch.float32, False)
    mm, *fast = run(torch.bfloat16, False)
    _, *slow = run(torch.bfloat16, True)  # autograd on: the fp32 read, as in training
    gate = mm.controller.layers[1].read_gate
    assert next(iter(gate._half_cache)) == torch.bfloat16
    assert fast[1].dtype == torch.float32  # the slots and the write stay fp32
    for f, s, r in zip(fast, slow, ref):
        err_fast, err_slow = (f - r).norm() / r.norm(), (s - r).norm() / r.norm()
        assert err_fast < 0.05 and err_fast <= 1.5 * err_slow, (err_fast, err_slow)


@contextlib.contextmanager
def _masks_given_to(base):
    """Records, for every forward of ``base``, whether it was given no attention mask."""
    seen: list[bool] = []
    spy = base.register_forward_pre_hook(lambda m, a, kw: seen.append(kw.get("attention_mask") is None),
                                         with_kwargs=True)
    try:
        yield seen
    finally:
        spy.remove()


def test_read_gives_the_base_no_padding_mask_where_a_segment_has_no_padding(tiny_model):
    """transformers checks a given padding mask on the host (a device sync); full segments skip it."""
    mm = attach_memory(tiny_model, GMA6Config(**SMALL))
    _perturb(mm)
    with _masks_given_to(tiny_model) as seen:
        ids = torch.randint(3, 64, (2, 20), generator=torch.Generator().manual_seed(8))
        mask = torch.ones_like(ids)
        mask[1, 14:] = 0  # row 1 ends inside the second segment
        mm.read(ids, segment_length=8, attention_mask=mask)
    assert seen == [True, False, False]  # segment 0 is full in both rows; 1 and 2 hold padding


def test_a_forward_without_a_mask_gives_the_base_none_and_equals_an_all_ones_mask(tiny_model):
    mm = attach_memory(tiny_model, GMA6Config(**SMALL))
    _perturb(mm)
    ids = torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(9))
    with _masks_given_to(tiny_model) as seen, torch.no_grad():
        state = mm.init_state(2)
        a = mm(input_ids=ids, memory_state=state)
        b = mm(input_ids=ids, attention_mask=torch.ones_like(ids), memory_state=state)
    assert seen == [True, False]
    assert torch.allclose(a.logits, b.logits, atol=1e-6)
    for name in ("memory", "usage", "age", "tokens_read"):
        assert torch.allclose(getattr(a.memory_state, name).float(), getattr(b.memory_state, name).float(), atol=1e-6)


def test_the_tokens_write_rule_starts_as_a_no_op_and_round_trips(tiny_model, tmp_path):
    x = torch.randint(3, 64, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = tiny_model(input_ids=x).logits
    mm = attach_memory(tiny_model, GMA6Config(write_rule="tokens", tokens_per_segment=2, **SMALL))
    state = mm.read(x, segment_length=6)
    with torch.no_grad():
        assert torch.allclose(mm(input_ids=x, memory_state=mm.init_state(2)).logits, want, atol=1e-5)
    _perturb(mm)
    with torch.no_grad():
        got = mm(input_ids=x[:, :5], memory_state=mm.read(x, segment_length=6)).logits
    mm.save_pretrained(tmp_path)
    mm.detach()
    loaded = gma6.load_adapter(tiny_model, tmp_path)
    assert loaded.config.write_rule == "tokens" and loaded.config.tokens_per_segment == 2
    with torch.no_grad():
        again = loaded(input_ids=x[:, :5], memory_state=loaded.read(x, segment_length=6)).logits
    assert torch.allclose(again, got, atol=1e-6) and state.age.max() > 0


def test_split_aligned_cuts_per_token_values_as_split_segments_cuts_the_tokens():
    from gma6.model import split_aligned, split_segments

    ids = torch.tensor([[1, 5, 6, 7, 8, 9, 10, 0], [1, 11, 12, 0, 0, 0, 0, 0]])
    mask = ids != 0
    mask[1, 0] = False  # row 1 left-padded: its BOS is padding, its text starts at 1
    for bos in (None, 1):
        segs = split_segments(ids, mask, 4, bos)
        vals = split_aligned(ids, ids, mask, 4, bos)  # values = the ids themselves: must come out equal
        assert len(vals) == len(segs)
        for (s_ids, s_mask), v in zip(segs, vals):
            assert torch.equal(v[s_mask], s_ids[s_mask] if bos is None else torch.where(s_ids == bos, 0, s_ids)[s_mask])
    with pytest.raises(ValueError, match="shape"):
        split_aligned(ids[:, :3], ids, mask, 4)
