#!/usr/bin/env python
"""Time ``read`` and ``generate`` of a bf16 base with the read in bf16 (the default at inference)
against the read in the memory's fp32 (what it did before), in one process; half, fp32, half again.

Run on the lent GPU after scripts/h100_prepare.sh (model at /tmp/g/gemma.gguf):
    python benchmarks/half_read_timing.py
Output of the 2026-11-26 H200 run: results/half-read-h200.txt.
"""
import time, torch, gma6, gma6.model, gma6.memory.attention as att
M = "/tmp/g/gemma.gguf"
base, tok = gma6.load_base(M, dtype=torch.bfloat16, device="cuda", progress=False)
mm = gma6.load_adapter(base, "src/gma6/adapters/gemma3-270m-babilong")
ids = torch.randint(10, 30000, (16, 1024), generator=torch.Generator().manual_seed(0)).cuda()
orig = att.read_dtype
def fp32_read(h_dtype, param_dtype, return_stats=False): return param_dtype
def t(fn, n=3):
    fn(); torch.cuda.synchronize(); best = 1e9
    for _ in range(n):
        t0 = time.perf_counter(); fn(); torch.cuda.synchronize(); best = min(best, time.perf_counter() - t0)
    return best
for name, f in (("half", orig), ("fp32", fp32_read), ("half2", orig)):
    att.read_dtype = f; gma6.model.read_dtype = f
    st = mm.read(ids, segment_length=256)
    r = t(lambda: mm.read(ids, segment_length=256))
    g = t(lambda: mm.generate(ids[:, :32], memory_state=st, max_new_tokens=8, do_sample=False))
    with mm.memory_disabled():
        gb = t(lambda: mm.base.generate(ids[:, :32], max_new_tokens=8, do_sample=False))
    print(f"{name}: read 16x1024 in 256-token segments {r*1e3:.1f} ms, generate 8 tokens {g*1e3:.1f} ms (bare {gb*1e3:.1f} ms)", flush=True)
