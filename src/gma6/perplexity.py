"""Does the memory hurt the base? Perplexity of a text read segment by segment, with and without it."""

from __future__ import annotations

import math
from typing import Any

import torch

from .model import split_segments


@torch.no_grad()
def segment_perplexity(model: Any, input_ids: torch.Tensor, segment_length: int, bos_token_id: int | None = None,
                       memory_state: Any = None) -> float:
    """Perplexity of ``input_ids`` (1, N) read in segments, the memory carried from segment to segment.

    Each segment is scored on its own tokens (BOS excluded) as the base sees it; inside
    ``model.memory_disabled()`` this is the bare base on the same segments. ``memory_state`` starts
    from an earlier reading (e.g. of unrelated text).
    """
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"input_ids must have shape (1, N), got {tuple(input_ids.shape)}")
    mask = torch.ones_like(input_ids, dtype=torch.bool)
    state = memory_state
    nll, count = 0.0, 0
    for ids, m in split_segments(input_ids, mask, segment_length, bos_token_id):
        ids, m = ids.to(model.device), m.to(model.device)
        labels = ids.masked_fill(~m, -100)
        if bos_token_id is not None:
            labels[:, 0] = -100
        out = model(input_ids=ids, attention_mask=m, labels=labels, memory_state=state)
        state = out.memory_state
        n = int((labels[:, 1:] != -100).sum())
        nll += float(out.loss) * n
        count += n
    return math.exp(nll / max(count, 1))
