"""Multiple-choice ranking agrees with scoring each candidate alone."""

from __future__ import annotations

import torch

from gma6 import GMA6Config, attach_memory
from gma6.choices import rank_choices

from conftest import tiny_gemma3
from wordtok import WordTokenizer


def test_rank_choices_matches_scoring_each_candidate_alone():
    tok = WordTokenizer(64)
    mm = attach_memory(tiny_gemma3(vocab=64), GMA6Config(num_slots=4, memory_dim=16, num_heads=2))
    with torch.no_grad():
        for p in mm.controller.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 0.3)
    state = mm.read(torch.randint(3, 64, (1, 20)), segment_length=8)
    prompt = [1] + tok.encode("where is mary ? answer :", add_special_tokens=False)
    choices = ["kitchen", "garden", "bathroom", "office"]

    def alone(c: str) -> float:
        ids = torch.tensor([prompt + tok.encode(" " + c, add_special_tokens=False)])
        logp = mm(input_ids=ids, memory_state=state, write=False).logits[0, :-1].log_softmax(-1)
        return float(logp[len(prompt) - 1 :].gather(-1, ids[0, len(prompt):, None]).sum())

    expected = max(choices, key=alone)
    assert rank_choices(mm, prompt, choices, tok, state) == expected
    with mm.memory_disabled():
        bare = max(choices, key=alone)
        assert rank_choices(mm, prompt, choices, tok, state) == bare
