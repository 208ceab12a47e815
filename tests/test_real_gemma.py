"""Integration tests on the real Gemma 3 270M (embedded default; converted once, then cached)."""

from __future__ import annotations

import pytest
import torch

from gma6 import GMA6Config, attach_memory

pytestmark = pytest.mark.slow


def test_embedded_default_is_gemma3_with_bos(real_gemma):
    model, tok = real_gemma
    assert model.config.get_text_config().model_type == "gemma3_text"
    assert model.config.get_text_config().hidden_size == 640
    ids = tok("Question: What is the capital of France?\nAnswer:", return_tensors="pt").input_ids
    assert ids[0, 0].item() == tok.bos_token_id
    out = model.generate(ids, max_new_tokens=2, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])


def test_fresh_memory_leaves_real_gemma_unchanged(real_gemma):
    model, tok = real_gemma
    ids = tok("Mary moved to the bathroom. John went to the hallway. Where is Mary?", return_tensors="pt").input_ids
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        mm = attach_memory(model, GMA6Config())
        try:
            state = mm.read(ids, segment_length=8)
            out = mm(input_ids=ids, memory_state=state)
            assert (out.logits - ref).abs().max().item() <= 1e-5
            assert mm.get_nb_trainable_parameters()[0] < 4_000_000
        finally:
            mm.detach()


def test_shipped_adapter_loads_onto_the_embedded_default(real_gemma):
    import gma6
    from gma6.base import default_adapter

    model, tok = real_gemma
    ids = tok("Mary moved to the bathroom. Where is Mary?", return_tensors="pt").input_ids
    with torch.no_grad():
        ref = model(input_ids=ids, logits_to_keep=1).logits
        mm = gma6.load_adapter(model, default_adapter())
        try:
            state = mm.read(ids, segment_length=8, bos_token_id=tok.bos_token_id)
            out = mm(input_ids=ids, memory_state=state, logits_to_keep=1, write=False)
            assert torch.isfinite(out.logits).all()
            assert (out.logits - ref).abs().max().item() > 1e-3  # a trained memory does change outputs
        finally:
            mm.detach()
        assert torch.equal(model(input_ids=ids, logits_to_keep=1).logits, ref)


def test_shipped_adapter_answers_on_a_half_precision_copy(real_gemma):
    """``evaluate`` loads the adapter itself (under inference mode) onto a bf16 base: the path the GPU runs. Its
    fp32 read adapters are cast at every read; it answers qa1 at 1k as it does in fp32 (2 samples: the same answers)."""
    import copy

    from gma6.base import default_adapter
    from gma6.evaluation import answer_text, evaluate

    model, tok = real_gemma
    half = copy.deepcopy(model).to(torch.bfloat16)
    kw = dict(tasks=["qa1"], lengths=["1k"], n=2, segment_length=256, systems=("memory",), adapter=default_adapter(),
              progress=False, batch_size=2)
    got = evaluate(half, tok, **kw)
    want = evaluate(model, tok, **kw)
    assert got["dtype"] == "bfloat16" and want["dtype"] == "float32"
    # What is scored (the first line) must agree; what the model goes on with after it may differ in bf16.
    assert [answer_text(o["output"]) for o in got["outputs"]] == [answer_text(o["output"]) for o in want["outputs"]]
    assert got["rows"][0]["accuracy"] == want["rows"][0]["accuracy"] == 1.0
