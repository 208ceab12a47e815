"""Multiple-choice answers: the candidate whose tokens the model finds most likely after the prompt.

Free generation judges whether a model answers *and stops*; ranking the task's candidate words
(chance 1/6 on qa1) judges what it knows. Both views are reported where they differ.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


@torch.no_grad()
def rank_choices(model: Any, prompt: Sequence[int], choices: Sequence[str], tokenizer: Any,
                 memory_state: Any = None) -> str:
    """Return the choice with the highest total log-probability after ``prompt``.

    Args:
        model: a memory model (its memory is read, not written) or a bare causal LM.
        prompt: token ids of the prompt (with BOS when the model needs it).
        choices: candidate answers; each is scored as ``" " + choice``.
        tokenizer: has ``encode(text, add_special_tokens=False)``.
        memory_state: the memory to read (memory models only), batch size 1.
    """
    if not choices:
        raise ValueError("choices is empty")
    encoded = [list(tokenizer.encode(" " + c, add_special_tokens=False)) for c in choices]
    rows = [list(prompt) + e for e in encoded]
    width, tail = max(map(len, rows)), max(map(len, encoded))
    device = next(model.parameters()).device
    ids = torch.zeros(len(rows), width, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    for i, r in enumerate(rows):  # left padding: every candidate ends at the last position
        ids[i, width - len(r):] = torch.tensor(r, device=device)
        mask[i, width - len(r):] = True
    kwargs: dict[str, Any] = {"attention_mask": mask, "logits_to_keep": tail + 1}
    if hasattr(model, "init_state"):
        state = memory_state.select([0] * len(rows)) if memory_state is not None else None
        kwargs.update(memory_state=state, write=False)
    logits = model(input_ids=ids, **kwargs).logits[:, :-1].float().log_softmax(-1)
    scores = []
    for i, e in enumerate(encoded):
        target = torch.tensor(e, device=device)
        picked = logits[i, tail - len(e):].gather(-1, target[:, None])
        scores.append(float(picked.sum()))
    return choices[max(range(len(choices)), key=scores.__getitem__)]
