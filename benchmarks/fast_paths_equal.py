#!/usr/bin/env python
"""The shipped adapter's fast paths against the plain ones on the real 270M: the batched tokens write and
the folded input norm (what reading takes) vs the per-layer write and the base's own norm call (what
``return_stats=True`` and a norm that does not fold take). Prints the largest differences.

    python benchmarks/fast_paths_equal.py
"""
from __future__ import annotations

import torch

import gma6
from gma6.model import split_segments

torch.manual_seed(0)
base, tok = gma6.load_base(progress=False)
mm = gma6.load_adapter(base, gma6.base.default_adapter())
ids = torch.randint(100, 20000, (2, 600))
q = torch.randint(100, 20000, (2, 40))
with torch.no_grad():
    fast_state = mm.read(ids, segment_length=256, bos_token_id=tok.bos_token_id)
    fast = mm(input_ids=q, memory_state=fast_state, write=False).logits
    gains, mm._fold_eps = mm._fold_eps, [None] * len(mm._fold_eps)
    try:
        state = mm.init_state(2)
        for seg, m in split_segments(ids, torch.ones_like(ids, dtype=torch.bool), 256, tok.bos_token_id):
            state = mm(input_ids=seg, attention_mask=m.long(), memory_state=state, return_stats=True).memory_state
        slow = mm(input_ids=q, memory_state=state, write=False).logits
    finally:
        mm._fold_eps = gains
print(f"slots max diff {(fast_state.memory - state.memory).abs().max():.2e}, "
      f"usage {(fast_state.usage - state.usage).abs().max():.2e}, "
      f"logits {(fast - slow).abs().max():.2e} (largest logit {fast.abs().max():.1f})")
