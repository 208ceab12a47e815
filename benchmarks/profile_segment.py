#!/usr/bin/env python
"""torch.profiler table of one 512-token segment through the shipped adapter, and of the same segment
through the base alone (its LoRA on, memory off): where the memory's read time goes.

    python benchmarks/profile_segment.py
"""
from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile

import gma6

torch.set_num_threads(1)
torch.manual_seed(0)
base, _ = gma6.load_base(progress=False)
mm = gma6.load_adapter(base, gma6.base.default_adapter())
ids = torch.randint(100, 20000, (1, 512))
with torch.no_grad():
    state = mm.init_state(1)
    for _ in range(3):  # a memory with something in it
        state = mm(input_ids=ids, memory_state=state, logits_to_keep=1).memory_state
    with profile(activities=[ProfilerActivity.CPU]) as memory:
        mm(input_ids=ids, memory_state=state, logits_to_keep=1)
    with mm.memory_disabled(keep_lora=True), profile(activities=[ProfilerActivity.CPU]) as bare:
        mm(input_ids=ids, logits_to_keep=1)
print("memory:\n" + memory.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
print("base (LoRA on, memory off):\n" + bare.key_averages().table(sort_by="self_cpu_time_total", row_limit=6))
