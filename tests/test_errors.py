"""Bad input meets a clear error: exception type and a message naming the problem."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gma6
from gma6 import GMA6Config, MemoryModel, attach_memory

from conftest import tiny_gemma3

SMALL = dict(num_slots=4, memory_dim=16, num_heads=2)


def test_layer_index_beyond_depth(tiny_model):
    with pytest.raises(ValueError, match=r"layers \[7\] are beyond the model's depth \(4 decoder layers"):
        attach_memory(tiny_model, GMA6Config(layers=[1, 7], **SMALL))


def test_adapter_for_another_hidden_size(tmp_path):
    attach_memory(tiny_gemma3(hidden=32), GMA6Config(**SMALL)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="hidden_size=32, but the model has 48"):
        MemoryModel.from_pretrained(tiny_gemma3(hidden=48), tmp_path)


def test_adapter_for_another_model_type(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    attach_memory(tiny_gemma3(hidden=32), GMA6Config(**SMALL)).save_pretrained(tmp_path)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                         num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(ValueError, match="model_type='gemma3_text'"):
        gma6.load_adapter(llama, tmp_path)


def test_adapter_weights_that_do_not_match_config(tmp_path, tiny_model):
    attach_memory(tiny_gemma3(), GMA6Config(**SMALL)).save_pretrained(tmp_path)
    cfg = GMA6Config.load(tmp_path)
    GMA6Config.from_dict({**cfg.to_dict(), "num_slots": 6}).save(tmp_path)
    with pytest.raises(ValueError, match="does not match its config"):
        MemoryModel.from_pretrained(tiny_model, tmp_path)
    assert not any(len(m._forward_hooks) for m in tiny_model.modules())  # the failed load left no hook


def test_state_from_another_config_or_batch(tiny_model):
    mm = attach_memory(tiny_model, GMA6Config(**SMALL))
    other = attach_memory(tiny_gemma3(seed=1), GMA6Config(num_slots=6, memory_dim=16, num_heads=2)).init_state(2)
    x = torch.randint(3, 64, (2, 8))
    with pytest.raises(ValueError, match="another config"):
        mm(input_ids=x, memory_state=other)
    with pytest.raises(ValueError, match="batch size 3, but the input has 2"):
        mm(input_ids=x, memory_state=mm.init_state(3))
    with pytest.raises(TypeError, match="MemoryState"):
        mm(input_ids=x, memory_state=torch.zeros(2))


def test_empty_and_malformed_input(tiny_model):
    mm = attach_memory(tiny_model, GMA6Config(**SMALL))
    with pytest.raises(ValueError, match="empty"):
        mm(input_ids=torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="empty"):
        mm.read(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="no real token"):
        mm(input_ids=torch.ones(1, 4, dtype=torch.long), attention_mask=torch.zeros(1, 4))
    with pytest.raises(TypeError, match="torch.Tensor"):
        mm(input_ids=[[1, 2, 3]])
    with pytest.raises(TypeError, match="integer token ids"):
        mm(input_ids=torch.ones(1, 3))
    with pytest.raises(ValueError, match="segment_length=0"):
        mm.read(torch.ones(1, 4, dtype=torch.long), segment_length=0)
    with pytest.raises(ValueError, match="batch_size=0"):
        mm.init_state(0)


def test_token_ids_outside_the_vocabulary(tiny_model):
    """Named with the offending id and the vocabulary, on every entry point (the embedding would raise a bare
    IndexError); RMT's entry points too."""
    good = torch.randint(0, 64, (1, 6))
    for config in (GMA6Config(**SMALL), GMA6Config(memory_type="rmt", num_slots=4)):
        mm = attach_memory(tiny_model, config)
        try:
            for bad, named in ((good + 64, r"token id \d+, outside the base's vocabulary of 64 \(ids 0..63\)"),
                               (good - 70, r"token id -\d+, outside")):
                with pytest.raises(ValueError, match=named):
                    mm(input_ids=bad)
                with pytest.raises(ValueError, match=named):
                    mm.read(bad, segment_length=4)
                with pytest.raises(ValueError, match=named):
                    mm.generate(bad, max_new_tokens=1)
            mm(input_ids=good)  # the edges of the vocabulary are fine
            mm(input_ids=torch.tensor([[0, 63]]))
        finally:
            mm.detach()


def test_not_a_decoder_only_lm():
    with pytest.raises(TypeError, match="Linear"):
        attach_memory(nn.Linear(3, 3))
    with pytest.raises(TypeError, match="torch.nn.Module"):
        attach_memory("gemma")
    from transformers import T5Config, T5ForConditionalGeneration

    t5 = T5ForConditionalGeneration(T5Config(vocab_size=32, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2))
    with pytest.raises(TypeError, match="encoder-decoder"):
        attach_memory(t5)
    from transformers import BertConfig, BertModel

    bert = BertModel(BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32))
    with pytest.raises(TypeError, match="language-model head"):
        attach_memory(bert)


def test_damaged_state_snapshot(tmp_path):
    p = tmp_path / "s.gma6"
    mm = attach_memory(tiny_gemma3(), GMA6Config(**SMALL))
    gma6.save_state(mm.init_state(1), p)
    p.write_bytes(p.read_bytes()[:50])
    with pytest.raises(ValueError, match="not a readable memory snapshot"):
        gma6.load_state(p)
    with pytest.raises(FileNotFoundError):
        gma6.load_state(tmp_path / "none.gma6")


def test_other_model_families_are_found_generically():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=3, n_head=2, n_positions=64)).eval()
    x = torch.randint(0, 64, (1, 8))
    ref = gpt2(input_ids=x).logits
    mm = attach_memory(gpt2, GMA6Config(**SMALL))
    assert mm.config.model_type == "gpt2"
    torch.testing.assert_close(mm(input_ids=x).logits, ref, rtol=0, atol=1e-5)
    state = mm.read(torch.randint(0, 64, (1, 20)), segment_length=8)
    assert state.segments_read == 3
