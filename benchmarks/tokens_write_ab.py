#!/usr/bin/env python
"""The base read's tokens write: all layers batched against layer by layer, on the shipped adapter.

Times, alternating, a training step (forward + backward, 2 segments of 512 tokens, batch 1, one thread)
and, without autograd, reading 4 x 2048 tokens, with each write path. The measurement behind
``MemoryController.write`` batching only without autograd.

    python benchmarks/tokens_write_ab.py
"""
from __future__ import annotations

import time

import torch

import gma6

torch.set_num_threads(1)
torch.manual_seed(0)
base, _ = gma6.load_base(progress=False)
mm = gma6.load_adapter(base, gma6.base.default_adapter())
ctl = mm.controller
paths = {"batched": ctl._write_tokens_batched,
         "per_layer": lambda st, h, m, full=False: ctl._write_tokens(st, h, m, False)[0]}
ids = torch.randint(100, 20000, (1, 1024))


def train_step() -> None:
    state, loss = mm.init_state(1), 0
    for s in range(0, 1024, 512):
        out = mm(input_ids=ids[:, s:s + 512], memory_state=state, logits_to_keep=32)
        state, loss = out.memory_state, loss + out.logits.float().logsumexp(-1).mean()
    loss.backward()
    mm.zero_grad(set_to_none=True)


def read() -> None:
    with torch.no_grad():
        mm.read(torch.randint(100, 20000, (4, 2048)), segment_length=512)


for what, fn in (("training step (autograd)", train_step), ("reading (no autograd)", read)):
    mm.train(what.startswith("training"))
    seconds: dict[str, list[float]] = {k: [] for k in paths}
    for _ in range(3):
        for name, path in paths.items():
            ctl._write_tokens_batched = path  # the write takes this path wherever it would batch
            t = time.perf_counter()
            fn()
            seconds[name].append(round(time.perf_counter() - t, 2))
    ctl._write_tokens_batched = paths["batched"]
    print(what, seconds)
