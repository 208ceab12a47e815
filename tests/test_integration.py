"""Integration helpers: finding layers and norms generically."""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from gma6.integration import rms_gain

from conftest import tiny_gemma3


def test_rms_gain_of_gemma_llama_and_none_for_layernorm():
    gemma = tiny_gemma3()
    norm = gemma.model.layers[1].input_layernorm
    with torch.no_grad():
        norm.weight.normal_()
    torch.testing.assert_close(rms_gain(norm, 32), 1 + norm.weight.float(), rtol=1e-4, atol=1e-5)
    llama = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, vocab_size=64))
    lnorm = llama.model.layers[1].input_layernorm
    with torch.no_grad():
        lnorm.weight.uniform_(0.5, 2.0)
    torch.testing.assert_close(rms_gain(lnorm, 32), lnorm.weight.float(), rtol=1e-4, atol=1e-5)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64))
    assert rms_gain(gpt2.transformer.h[1].ln_1, 32) is None  # LayerNorm subtracts the mean: not foldable
