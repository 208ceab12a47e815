"""Shared fixtures: tiny Gemma 3 models built in the test (no hub) and the real 270M, cached."""

from __future__ import annotations

import os

# Triton (where installed) runs its kernels through its interpreter, on CPU tensors: how tests/test_triton_read.py
# checks gma6's read kernel without a GPU. Triton reads this once, when it is first imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def tiny_gemma3(seed: int = 0, layers: int = 4, hidden: int = 32, vocab: int = 64, head_dim: int = 16):
    """A random Gemma 3 text model small enough for unit tests."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    types = ["sliding_attention"] * layers
    types[-2 if layers > 1 else 0] = "full_attention"
    cfg = Gemma3TextConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=head_dim,
        sliding_window=16,
        layer_types=types,
        max_position_embeddings=1024,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    cfg._attn_implementation = "sdpa"
    return Gemma3ForCausalLM(cfg).eval()


def perturb(mm, seed: int = 0) -> None:
    """Give every memory weight a random value, so the memory actually reads and writes."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in mm.controller.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)


def base_read_config(**kw):
    """The shipped default's kind (tokens kept as slots, read inside the next layer's attention) at test size."""
    from gma6 import GMA6Config

    args = dict(num_slots=6, memory_dim=None, layers=[0, 1, 2], write_rule="tokens", tokens_per_segment=3,
                read_rule="base", token_retention="priority", usage_decay=0.99, read_site="attention")
    args.update(kw)
    return GMA6Config(**args)


def trained_base_read(base, **kw):
    """``base_read_config(**kw)`` attached to ``base`` with random weights (the same for the same ``kw``)."""
    from gma6 import attach_memory

    torch.manual_seed(5)  # the memory's initial weights too: models compared get the same
    mm = attach_memory(base, base_read_config(**kw))
    perturb(mm)
    return mm


@pytest.fixture
def tiny_model():
    return tiny_gemma3()


@pytest.fixture(scope="session")
def real_gemma():
    """The embedded Gemma 3 270M in fp32 (the first load converts and caches it)."""
    if os.environ.get("GMA6_SKIP_REAL") == "1":
        pytest.skip("GMA6_SKIP_REAL=1")
    from gma6 import load_base

    return load_base(progress=False)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run far faster on one thread than fighting for two shared cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
