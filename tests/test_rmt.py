"""RMTMemoryModel (memory tokens) on a tiny Gemma 3: bare when off, explicit state, padding, save/load, learning."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

import gma6
from gma6 import GMA6Config, attach_memory
from gma6.integration import hook_count
from gma6.rmt import RMTMemoryModel, update_parameter_count

from conftest import perturb as _perturb
from conftest import tiny_gemma3

RMT = dict(memory_type="rmt", num_slots=4)


def _ids(shape, seed):
    return torch.randint(3, 64, shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------- 1. off = bare base
def test_attach_gives_rmt_and_disabled_is_the_bare_base(tiny_model):
    x = _ids((2, 12), 1)
    ref = tiny_model(input_ids=x, labels=x)
    mm = attach_memory(tiny_model, GMA6Config(**RMT))
    assert isinstance(mm, RMTMemoryModel)
    assert mm.controller.shape == (1, 4, 32)
    _perturb(mm)
    with mm.memory_disabled():
        out = mm(input_ids=x, labels=x)
        assert torch.equal(out.logits, ref.logits)
        assert torch.equal(out.loss, ref.loss)
        prompt = x[:1, :5]
        bare = mm.generate(prompt, max_new_tokens=4, do_sample=False)
    assert torch.equal(bare, tiny_model.generate(prompt, max_new_tokens=4, do_sample=False))
    # the memory tokens do change the outputs when on
    assert (mm(input_ids=x).logits - ref.logits).abs().max().item() > 1e-3


def test_logits_align_with_input_and_loss_is_shifted_cross_entropy(tiny_model):
    mm = attach_memory(tiny_model, GMA6Config(**RMT))
    x = _ids((2, 10), 2)
    labels = x.clone()
    labels[0, :3] = -100
    out = mm(input_ids=x, labels=labels)
    assert out.logits.shape == (2, 10, 64)
    ref = F.cross_entropy(out.logits[:, :-1].reshape(-1, 64), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, ref)
    last = mm(input_ids=x, logits_to_keep=3).logits
    torch.testing.assert_close(last, out.logits[:, -3:], rtol=0, atol=1e-5)
    picked = mm(input_ids=x, logits_to_keep=torch.tensor([0, 4])).logits
    torch.testing.assert_close(picked, out.logits[:, [0, 4]], rtol=0, atol=1e-5)


def test_fresh_update_map_keeps_the_initial_memory(tiny_model):
    mm = attach_memory(tiny_model, GMA6Config(**RMT))
    state = mm.init_state(2)
    init = state.memory.clone()
    for _ in range(3):  # zero-initialised Linear: the first segments leave the memory as it starts
        state = mm(input_ids=_ids((2, 8), 3), memory_state=state).memory_state
    assert torch.equal(state.memory, init)
    assert state.segments_read == 3 and state.tokens_read.tolist() == [24, 24]
    assert state.age.shape == (2, 1, 4) and torch.equal(state.age, torch.full((2, 1, 4), 3.0))
    # the initial memory sits at the scale of real token embeddings (Gemma's sqrt(H) included)
    emb = tiny_model.get_input_embeddings()(torch.arange(3, 64))
    rms_mem = mm.controller.initial_memory.detach().pow(2).mean().sqrt()
    assert 0.5 < float(rms_mem / emb.pow(2).mean().sqrt()) < 2.0


def test_parameter_count_and_print(tiny_model, capsys):
    mm = attach_memory(tiny_model, GMA6Config(**RMT))
    assert {id(p) for p in mm.memory_parameters()} == {id(p) for p in mm.parameters() if p.requires_grad}
    trainable, total = mm.get_nb_trainable_parameters()
    assert trainable == sum(p.numel() for p in mm.memory_parameters()) == update_parameter_count(4, 32)
    assert total == trainable + sum(p.numel() for p in tiny_model.parameters())
    mm.print_trainable_parameters()
    line = capsys.readouterr().out
    assert line.startswith(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%:")
    assert update_parameter_count(16, 640) == 432_000  # Gemma 3 270M, 16 memory tokens


# ---------------------------------------------------------------------- 2. only the memory trains
def test_only_memory_parameters_train(tiny_model):
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    mm = attach_memory(tiny_model, GMA6Config(**RMT))
    start = {n: p.detach().clone() for n, p in mm.controller.named_parameters()}
    opt = torch.optim.AdamW(mm.memory_parameters(), lr=1e-2)
    x = _ids((2, 8), 4)
    for _ in range(3):
        state = mm.init_state(2)
        for _ in range(2):  # two chained segments: the second's loss reaches the first's write
            out = mm(input_ids=x, labels=x, memory_state=state)
            state = out.memory_state
        out.loss.backward()
        assert all(p.grad is None for p in tiny_model.parameters())
        assert mm.controller.update.weight.grad.abs().sum() > 0
        opt.step()
        opt.zero_grad()
    for k, v in tiny_model.state_dict().items():
        assert torch.equal(v, before[k]), k
    changed = [n for n, p in mm.controller.named_parameters() if not torch.equal(p, start[n])]
    assert sorted(changed) == sorted(start)


# ---------------------------------------------------------------------- 3. persistence
def test_save_load_adapter_gives_identical_logits(tiny_model, tmp_path):
    mm = attach_memory(tiny_model, GMA6Config(**RMT))
    _perturb(mm)
    x = _ids((2, 16), 5)
    state = mm.read(x, segment_length=8)
    ref = mm(input_ids=x, memory_state=state).logits
    mm.save_pretrained(tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["gma6_config.json", "memory_adapter.safetensors"]
    base = mm.detach()
    loaded = gma6.load_adapter(base, tmp_path / "adapter")
    assert isinstance(loaded, RMTMemoryModel) and loaded.config.memory_type == "rmt"
    state2 = loaded.read(x, segment_length=8)
    assert torch.equal(state2.memory, state.memory)
    assert torch.equal(loaded(input_ids=x, memory_state=state2).logits, ref)


def test_adapter_that_does_not_match_its_config(tiny_model, tmp_path):
    attach_memory(tiny_gemma3(), GMA6Config(**RMT)).save_pretrained(tmp_path)
    cfg = GMA6Config.load(tmp_path)
    GMA6Config.from_dict({**cfg.to_dict(), "num_slots": 6}).save(tmp_path)
    n_hooks = hook_count(tiny_model)
    flags = {n: p.requires_grad for n, p in tiny_model.named_parameters()}
    with pytest.raises(ValueError, match="does not match its config"):
        gma6.load_adapter(tiny_model, tmp_path)
    assert hook_count(tiny_model) == n_hooks
    assert {n: p.requires_grad for n, p in tiny_model.named_parameters()} == flags
    with pytest.raises(ValueError, match="hidden_size=32, but the model has 48"):
        RMTMemoryModel.from_pretrained(tiny_gemma3(hidden=48), tmp_path)


def test_state_snapshot_round_trips(tiny_model, tmp_path):
    mm = attach_memory(tiny_model, GMA6Config(**RMT))
    _perturb(mm)
    x = _ids((2, 20), 6)
    state = mm.read(x, segment_length=8)
    gma6.save_state(state, tmp_path / "s.gma6")
    back = gma6.load_state(tmp_path / "s.gma6")
    for name in ("memory", "usage", "age", "tokens_read"):
        assert torch.equal(getattr(back, name), getattr(state, name)), name
    assert back.segments_read == state.segments_read == 3
    q = _ids((2, 6), 7)
    assert torch.equal(mm(input_ids=q, memory_state=back).logits, mm(input_ids=q, memory_state=state).logits)


# ---------------------------------------------------------------------- 4. read, padding
def test_read_equals_manual_stepping(tiny_model):
    mm = attach_memory(tiny_model, GMA6Config(**RMT))
    _perturb(mm)
    x = _ids((2, 29), 8)
    state = mm.read(x, segment_length=8)
    manual = mm.init_state(2)
    with torch.no_grad():
        for s in range(0, 29, 8):
            manual = mm(input_ids=x[:, s : s + 8], memory_state=manual).memory_state
    assert state.segments_read == manual.segments_read == 4
    torch.testing.assert_close(state.memory, manual.memory, rtol=0, atol=1e-6)
    assert torch.equal(state.age, manual.age)
    assert state.tokens_read.tolist() == [29, 29]
    assert not torch.allclose(state.memory, mm.init_state(2).memory)


def test_padded_batch_sample_matches_alone(tiny_model):
    mm = attach_memory(tiny_model, GMA6Config(**RMT))
    _perturb(mm)
    g = torch.Generator().manual_seed(9)
    a, b = torch.randint(3, 64, (1, 21), generator=g), torch.randint(3, 64, (1, 13), generator=g)
    alone_a, alone_b = mm.read(a, segment_length=8), mm.read(b, segment_length=8)
    ids = torch.zeros(2, 21, dtype=torch.long)
    mask = torch.zeros(2, 21, dtype=torch.long)
    ids[0], mask[0] = a[0], 1
    ids[1, 8:], mask[1, 8:] = b[0], 1  # left padding: read() packs it to the right
    batch = mm.read(ids, segment_length=8, attention_mask=mask)
    torch.testing.assert_close(batch.memory[0], alone_a.memory[0], rtol=0, atol=1e-5)
    # b fills 2 segments; its third segment is empty and keeps its memory
    torch.testing.assert_close(batch.memory[1], alone_b.memory[0], rtol=0, atol=1e-5)
    assert batch.tokens_read.tolist() == [21, 13]
    assert batch.age[:, 0, 0].tolist() == [3.0, 2.0]
    ids2 = ids.clone()
    ids2[1, 8:] = torch.randint(3, 64, (13,), generator=g)
    other = mm.read(ids2, segment_length=8, attention_mask=mask)
    torch.testing.assert_close(other.memory[0], batch.memory[0], rtol=0, atol=1e-6)
    assert not torch.allclose(other.memory[1], batch.memory[1])


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_forward_logits_and_write_match_alone(tiny_model, side):
    mm = attach_memory(tiny_model, GMA6Config(**RMT))
    _perturb(mm)
    g = torch.Generator().manual_seed(10)
    state = mm.read(torch.randint(3, 64, (2, 16), generator=g), segment_length=8)
    a, b = torch.randint(3, 64, (1, 8), generator=g), torch.randint(3, 64, (1, 5), generator=g)
    ids = torch.zeros(2, 8, dtype=torch.long)
    mask = torch.zeros(2, 8, dtype=torch.long)
    ids[0], mask[0] = a[0], 1
    where = slice(0, 5) if side == "right" else slice(3, 8)
    ids[1, where], mask[1, where] = b[0], 1
    out = mm(input_ids=ids, attention_mask=mask, memory_state=state)
    alone = mm(input_ids=b, memory_state=state.select([1]))
    torch.testing.assert_close(out.logits[1, where], alone.logits[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(out.memory_state.memory[1], alone.memory_state.memory[0], rtol=0, atol=1e-5)
    full = mm(input_ids=a, memory_state=state.select([0]))
    torch.testing.assert_close(out.memory_state.memory[0], full.memory_state.memory[0], rtol=0, atol=1e-5)


def test_sample_without_tokens_keeps_its_memory_and_write_false_keeps_state(tiny_model):
    mm = attach_memory(tiny_model, GMA6Config(**RMT))
    _perturb(mm)
    state = mm.read(_ids((2, 8), 11), segment_length=8)
    mask = torch.tensor([[1] * 6, [0] * 6])
    out = mm(input_ids=_ids((2, 6), 12), attention_mask=mask, memory_state=state, return_stats=True)
    assert torch.equal(out.memory_state.memory[1], state.memory[1])
    assert not torch.equal(out.memory_state.memory[0], state.memory[0])
    assert out.memory_state.age[:, 0, 0].tolist() == [2.0, 1.0]
    assert out.memory_state.tokens_read.tolist() == [14, 8]
    assert out.stats[0]["update_norm"].shape == (2, 4) and float(out.stats[0]["update_norm"][1].abs().sum()) == 0.0
    ro = mm(input_ids=_ids((2, 6), 13), memory_state=state, write=False)
    assert ro.memory_state.segments_read == state.segments_read
    for name in ("memory", "usage", "age", "tokens_read"):
        assert torch.equal(getattr(ro.memory_state, name), getattr(state, name)), name


def test_generate_reads_memory_and_matches_forward(tiny_model):
    mm = attach_memory(tiny_model, GMA6Config(**RMT))
    _perturb(mm)
    state = mm.read(_ids((1, 24), 14), segment_length=8)
    prompt = _ids((1, 5), 15)
    out = mm.generate(prompt, memory_state=state, max_new_tokens=4, do_sample=False)
    ids = prompt  # greedy decoding by hand, memory read-only, no cache
    for _ in range(4):
        logits = mm(input_ids=ids, memory_state=state, write=False).logits
        ids = torch.cat([ids, logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, ids)
    fresh = mm.generate(prompt, max_new_tokens=4, do_sample=False)  # default: a fresh memory
    assert fresh.shape == (1, 9) and torch.equal(fresh[:, :5], prompt)


# ---------------------------------------------------------------------- 5. learning
KEYS = torch.arange(10, 26)  # 16 keys
SEG, N_SEG, QUERY = 8, 3, 5


def key_batch(keys: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """The key at the start of segment 1; random filler everywhere else; a query token at the end."""
    x = torch.randint(30, 64, (len(keys), SEG * N_SEG), generator=g)
    x[:, 0] = keys
    x[:, -1] = QUERY
    return x


def accuracy_and_loss(mm, x: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    state = mm.init_state(x.shape[0])
    for s in range(0, x.shape[1], SEG):
        last = s + SEG >= x.shape[1]  # the query segment's write would be thrown away
        out = mm(input_ids=x[:, s : s + SEG], memory_state=state, logits_to_keep=1, write=not last)
        state = out.memory_state
    logits = out.logits[:, -1]
    return (logits.argmax(-1) == keys).float().mean(), F.cross_entropy(logits, keys)


def test_frozen_tiny_gemma_learns_to_carry_a_key_across_segments():
    """The memory tokens alone learn to carry a key over a segment of filler to a query.

    The tiny Gemma (2 layers, hidden 64) uses ``query_pre_attn_scalar = head_dim`` (16), as the
    real Gemma 3 270M does (256 = 256): with conftest's default 256 and head_dim 16, the
    q/k-normed attention logits of the random model stay within ±1, attention is near uniform,
    and memory tokens, which act only through attention, learn very slowly (about 0.5 accuracy
    after 1200 steps at hidden 32). Training stops early once a validation batch reaches 0.97;
    the assertion is on a separate test batch (every key with 4 fresh fillers).
    """
    torch.manual_seed(0)
    base = tiny_gemma3(seed=0, layers=2, hidden=64)
    base.config.query_pre_attn_scalar = base.config.head_dim
    for layer in base.model.layers:
        layer.self_attn.scaling = base.config.head_dim**-0.5
    mm = attach_memory(base, GMA6Config(memory_type="rmt", num_slots=8))
    opt = torch.optim.AdamW(mm.memory_parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    keys4 = KEYS.repeat(4)  # every key with 4 fresh fillers
    val = key_batch(keys4, torch.Generator().manual_seed(7))
    test = key_batch(keys4, torch.Generator().manual_seed(123))
    with torch.no_grad():
        before, _ = accuracy_and_loss(mm, test, keys4)
    t0 = time.perf_counter()
    for step in range(1, 401):
        keys = KEYS[torch.randint(0, 16, (32,), generator=g)]
        _, loss = accuracy_and_loss(mm, key_batch(keys, g), keys)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step >= 150 and step % 25 == 0:  # early stop on a validation batch, judged on another
            with torch.no_grad():
                if accuracy_and_loss(mm, val, keys4)[0] >= 0.97:
                    break
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        after, _ = accuracy_and_loss(mm, test, keys4)
        with mm.memory_disabled():
            bare, _ = accuracy_and_loss(mm, test, keys4)
    assert before <= 0.25 and bare <= 0.25  # chance is 1/16
    print(f"rmt key carry: accuracy {after:.2f} after {step} steps ({seconds:.1f} s)")
    assert after >= 0.9, f"accuracy {after:.2f} after {step} steps ({seconds:.0f} s)"


# ---------------------------------------------------------------------- 6. detach, errors
def test_detach_leaves_no_hook_and_restores_base(tiny_model):
    x = _ids((1, 8), 16)
    ref = tiny_model(input_ids=x).logits
    tiny_model.lm_head.weight.requires_grad_(True)
    flags = {n: p.requires_grad for n, p in tiny_model.named_parameters()}
    n_hooks = hook_count(tiny_model)
    mm = attach_memory(tiny_model, GMA6Config(**RMT))
    assert not any(p.requires_grad for p in tiny_model.parameters())
    _perturb(mm)
    mm(input_ids=x)
    assert hook_count(tiny_model) == n_hooks  # RMT hooks nothing for longer than a call
    base = mm.detach()
    assert base is tiny_model
    assert hook_count(base) == n_hooks
    assert {n: p.requires_grad for n, p in base.named_parameters()} == flags
    assert torch.equal(base(input_ids=x).logits, ref)
    for call in (lambda: mm(input_ids=x), lambda: mm.read(x), lambda: mm.generate(x), lambda: mm.init_state(1)):
        with pytest.raises(RuntimeError, match="detached"):
            call()


def test_bad_input_and_state(tiny_model):
    mm = attach_memory(tiny_model, GMA6Config(**RMT))
    x = _ids((2, 8), 17)
    with pytest.raises(ValueError, match="empty"):
        mm(input_ids=torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="empty"):
        mm.read(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="no real token"):
        mm(input_ids=torch.ones(1, 4, dtype=torch.long), attention_mask=torch.zeros(1, 4))
    with pytest.raises(TypeError, match="integer token ids"):
        mm(input_ids=torch.ones(1, 3))
    other = attach_memory(tiny_gemma3(seed=1), GMA6Config(memory_type="rmt", num_slots=6)).init_state(2)
    with pytest.raises(ValueError, match="another config"):
        mm(input_ids=x, memory_state=other)
    gated = attach_memory(tiny_gemma3(seed=1), GMA6Config(num_slots=4, memory_dim=16, num_heads=2)).init_state(2)
    with pytest.raises(ValueError, match="another config"):
        mm(input_ids=x, memory_state=gated)
    with pytest.raises(ValueError, match="batch size 3, but the input has 2"):
        mm(input_ids=x, memory_state=mm.init_state(3))
    with pytest.raises(ValueError, match="batch size 3, but the input has 2"):
        mm.generate(x, memory_state=mm.init_state(3), max_new_tokens=1)
    with pytest.raises(TypeError, match="MemoryState"):
        mm(input_ids=x, memory_state=torch.zeros(2))
    with pytest.raises(ValueError, match="batch_size=0"):
        mm.init_state(0)
    with pytest.raises(ValueError, match="segment_length=0"):
        mm.read(x, segment_length=0)
    with pytest.raises(TypeError, match="position_ids"):
        mm(input_ids=x, position_ids=torch.arange(8)[None])
    with pytest.raises(ValueError, match="logits_to_keep"):
        mm(input_ids=x, labels=x, logits_to_keep=1)


def test_works_on_another_model_family():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=3, n_head=2, n_positions=64,
                                      bos_token_id=1, eos_token_id=2)).eval()
    x = torch.randint(0, 64, (1, 8))
    ref = gpt2(input_ids=x).logits
    mm = attach_memory(gpt2, GMA6Config(**RMT))
    assert mm.config.model_type == "gpt2"
    with mm.memory_disabled():
        assert torch.equal(mm(input_ids=x).logits, ref)
    _perturb(mm)
    state = mm.read(torch.randint(0, 64, (1, 20)), segment_length=8)
    assert state.segments_read == 3 and state.memory.shape == (1, 1, 4, 32)
