"""LoRA co-trained with the memory: only memory and LoRA weights change, saved and loaded with the
adapter, removed by detach() (tiny Gemma 3, CPU)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("peft")  # the [lora] extra; installed by the test extra and in CI

import gma6  # noqa: E402
from gma6 import GMA6Config, attach_memory  # noqa: E402
from gma6.lora import LORA_WEIGHTS_NAME, has_lora  # noqa: E402
from gma6.training import TrainConfig, train  # noqa: E402

from conftest import tiny_gemma3  # noqa: E402
from wordtok import WordTokenizer  # noqa: E402

SMALL = dict(num_slots=4, memory_dim=16, num_heads=2)
TOK = WordTokenizer()


def test_lora_starts_as_a_no_op_and_detach_removes_it():
    base = tiny_gemma3()
    x = torch.randint(3, 64, (1, 8))
    ref = base(input_ids=x).logits
    names = [n for n, _ in base.named_parameters()]
    mm = attach_memory(base, GMA6Config(**SMALL))
    params = mm.add_lora(4)
    assert params and all(p.requires_grad for p in params) and mm.config.lora_rank == 4
    assert torch.allclose(mm(input_ids=x).logits, ref, atol=1e-6)
    assert mm.detach() is base and not has_lora(base) and not hasattr(base, "peft_config")
    assert [n for n, _ in base.named_parameters()] == names and torch.equal(base(input_ids=x).logits, ref)


def test_training_changes_only_memory_and_lora_and_the_adapter_keeps_both(tmp_path):
    base = tiny_gemma3(vocab=128)
    frozen = {n: p.detach().clone() for n, p in base.named_parameters()}
    mm = attach_memory(base, GMA6Config(**SMALL))
    cfg = TrainConfig(curriculum=[1], steps_per_stage=3, batch_size=2, segment_length=48, lora_rank=4, warmup_steps=1,
                      log_every=1)
    train(mm, TOK, cfg, tmp_path, progress=False)
    lora = {n: p.detach().clone() for n, p in base.named_parameters() if "lora_" in n}
    assert any(float(p.abs().sum()) > 0 for n, p in lora.items() if "lora_B" in n)  # B starts at zero: it trained
    for n, p in base.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, frozen[n.replace(".base_layer", "")]), n
    assert (tmp_path / "adapter" / LORA_WEIGHTS_NAME).exists()
    x = torch.randint(3, 128, (1, 12))
    state = mm.read(x, segment_length=6)
    want = mm(input_ids=x[:, :5], memory_state=state).logits
    mm.detach()

    other = tiny_gemma3(vocab=128)
    loaded = gma6.load_adapter(other, tmp_path / "adapter")
    assert loaded.config.lora_rank == 4 and has_lora(other)
    got = loaded(input_ids=x[:, :5], memory_state=loaded.read(x, segment_length=6)).logits
    assert torch.allclose(got, want, atol=1e-5)
    loaded.detach()
    assert not has_lora(other)


def test_bad_lora_requests_are_refused(tmp_path):
    base = tiny_gemma3()
    mm = attach_memory(base, GMA6Config(**SMALL))
    with pytest.raises(ValueError, match="rank"):
        mm.add_lora(0)
    with pytest.raises(ValueError, match="not modules"):
        mm.add_lora(2, targets=["nope_proj"])
    mm.add_lora(2)
    with pytest.raises(ValueError, match="already has LoRA"):
        mm.add_lora(2)
    mm.save_pretrained(tmp_path / "a")
    mm.detach()
    (tmp_path / "a" / LORA_WEIGHTS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match="lora_rank=2"):
        gma6.load_adapter(base, tmp_path / "a")
    assert not has_lora(base)
    with pytest.raises(ValueError, match="lora_rank"):
        GMA6Config(lora_rank=-1)


def test_memory_disabled_is_the_bare_base_without_lora():
    torch.manual_seed(0)
    base = tiny_gemma3()
    x = torch.randint(3, 64, (1, 8))
    ref = base(input_ids=x).logits
    mm = attach_memory(base, GMA6Config(**SMALL))
    params = mm.add_lora(4)
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.5)  # a trained LoRA: B no longer zero
    with_lora = mm(input_ids=x).logits
    assert not torch.allclose(with_lora, ref, atol=1e-3)
    with mm.memory_disabled():
        assert torch.allclose(mm(input_ids=x).logits, ref, atol=1e-6)
    assert all(p.requires_grad for p in params)  # still trainable after the block
    assert torch.equal(mm(input_ids=x).logits, with_lora)


def test_in_context_training_changes_only_lora_and_sees_the_whole_context(tmp_path):
    base = tiny_gemma3(vocab=128)
    frozen = {n: p.detach().clone() for n, p in base.named_parameters()}
    mm = attach_memory(base, GMA6Config(**SMALL))
    memory = {n: p.detach().clone() for n, p in mm.controller.named_parameters()}
    seen = []
    handle = base.model.embed_tokens.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1]))
    cfg = TrainConfig(curriculum=[2], steps_per_stage=3, batch_size=2, segment_length=48, lora_rank=4, warmup_steps=1,
                      log_every=1, in_context=True)
    try:
        train(mm, TOK, cfg, tmp_path, progress=False)
    finally:
        handle.remove()
    assert min(seen) > 48  # one window longer than a segment: context and question together
    assert any(float(p.abs().sum()) > 0 for n, p in base.named_parameters() if "lora_B" in n)
    for n, p in base.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, frozen[n.replace(".base_layer", "")]), n
    for n, p in mm.controller.named_parameters():
        assert torch.equal(p, memory[n]), n  # the memory is switched off: untouched
    with pytest.raises(ValueError, match="other settings"):  # a memory run cannot resume it
        train(mm, TOK, TrainConfig(**{**cfg.__dict__, "in_context": False, "steps_per_stage": 4}), tmp_path,
              progress=False)
