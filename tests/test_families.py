"""Other model families through the same hooks (tiny random models built here, no hub): layers and
the base's reading norms are found generically; at initialisation the outputs are unchanged; a
trained memory carries across segments; ``detach()`` gives the base back untouched."""

from __future__ import annotations

import pytest
import torch

from gma6 import GMA6Config, attach_memory
from gma6.integration import find_decoder_layers, find_reading_norms, hook_count

SMALL = dict(num_slots=4, memory_dim=16, num_heads=2)
COMMON = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _family(name: str) -> torch.nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    if name == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=64, n_embd=32, n_layer=4, n_head=4, n_positions=128))
    config_cls, model_cls = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
        "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM),
        "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM),
    }[name]
    extra = {"head_dim": 8} if name == "gemma2" else {}
    return model_cls(config_cls(**COMMON, **extra))


FAMILIES = ["llama", "qwen2", "mistral", "gemma2", "phi3", "gpt2"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", ["gated", "rmt"])
def test_family_attaches_reads_trains_and_detaches(family, kind):
    base = _family(family).eval()
    assert len(find_decoder_layers(base)) == 4
    x = torch.randint(3, 64, (2, 24))
    ref = base(input_ids=x).logits
    names = {n: p.detach().clone() for n, p in base.named_parameters()}
    hooks = hook_count(base)
    cfg = GMA6Config(memory_type=kind, **SMALL)
    mm = attach_memory(base, cfg)
    try:
        assert mm.config.model_type == base.config.model_type and mm.config.hidden_size == 32
        if kind == "gated":
            assert all(n is not None for n in find_reading_norms(base, mm.config.layers))
            # a fresh gated memory changes nothing, whatever it has read
            state = mm.read(x, segment_length=8)
            assert torch.allclose(mm(input_ids=x, memory_state=state).logits, ref, atol=1e-5)
        # one step on a loss after reading three segments: gradients reach the memory only
        state = mm.init_state(2)
        for s in range(0, 16, 8):
            state = mm(input_ids=x[:, s:s + 8], memory_state=state).memory_state
        out = mm(input_ids=x[:, 16:], memory_state=state, labels=x[:, 16:])
        out.loss.backward()
        grads = [p.grad for p in mm.memory_parameters()]
        assert any(g is not None and float(g.abs().sum()) > 0 for g in grads)
        assert all(p.grad is None for p in base.parameters())
    finally:
        back = mm.detach()
    assert back is base and hook_count(base) == hooks
    assert all(torch.equal(p, names[n]) for n, p in base.named_parameters())
    assert torch.equal(base(input_ids=x).logits, ref)


@pytest.mark.parametrize("site", ["residual", "attention"])
@pytest.mark.parametrize("family", FAMILIES)
def test_the_base_read_on_each_family(family, site):
    """read_rule='base' on families whose attention has q/k/v/o projections (Llama, Qwen2, Mistral, Gemma 2):
    unchanged at init, changed once its gates open, trained through (gradients reach the memory only); refused with a clear TypeError where it has none (Phi-3's fused qkv, GPT-2)."""
    base = _family(family).eval()
    cfg = GMA6Config(num_slots=6, memory_dim=None, layers=[0, 1], write_rule="tokens", tokens_per_segment=3,
                     read_rule="base", read_rank=2, read_site=site)
    if family in ("phi3", "gpt2"):
        with pytest.raises(TypeError, match="read_rule='base'"):
            attach_memory(base, cfg)
        assert hook_count(base) == 0
        return
    x = torch.randint(3, 64, (2, 16))
    with torch.no_grad():
        ref = base(input_ids=x).logits
    mm = attach_memory(base, cfg)
    try:
        state = mm.read(x, segment_length=8)
        assert torch.allclose(mm(input_ids=x, memory_state=state).logits, ref, atol=1e-5)
        with torch.no_grad():
            for layer in mm.controller.layers:
                layer.base_gate.fill_(1.0)
        out = mm(input_ids=x, memory_state=state, labels=x)
        assert (out.logits - ref).abs().max() > 1e-4
        out.loss.backward()
        assert all(p.grad is None for p in base.parameters())
        assert all(torch.isfinite(layer.base_gate.grad).all() and layer.base_gate.grad.abs().sum() > 0
                   for layer in mm.controller.layers)
    finally:
        mm.detach()
    assert hook_count(base) == 0
