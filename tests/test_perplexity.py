"""segment_perplexity: a fresh memory leaves the base's perplexity exactly as it is."""

from __future__ import annotations

import math

import torch

from gma6 import GMA6Config, attach_memory
from gma6.perplexity import segment_perplexity

from conftest import perturb, tiny_gemma3


def test_fresh_memory_equals_bare_and_trained_memory_differs():
    mm = attach_memory(tiny_gemma3(), GMA6Config(num_slots=4, memory_dim=16, num_heads=2))
    ids = torch.randint(3, 64, (1, 40), generator=torch.Generator().manual_seed(0))
    with mm.memory_disabled():
        bare = segment_perplexity(mm, ids, 16, bos_token_id=1)
    fresh = segment_perplexity(mm, ids, 16, bos_token_id=1)
    assert math.isclose(fresh, bare, rel_tol=1e-6)
    # by hand: the bare base on each segment, BOS excluded from the scored tokens
    nll, n = 0.0, 0
    for s in range(0, 40, 15):
        seg = torch.cat([torch.tensor([[1]]), ids[:, s : s + 15]], 1)
        logp = mm.base(input_ids=seg).logits[0, :-1].log_softmax(-1)
        nll -= float(logp.gather(-1, seg[0, 1:, None]).sum())
        n += seg.shape[1] - 1
    assert math.isclose(bare, math.exp(nll / n), rel_tol=1e-5)
    perturb(mm)
    assert not math.isclose(segment_perplexity(mm, ids, 16, bos_token_id=1), bare, rel_tol=1e-4)
