"""Peak RSS of one training step with the KL term on the real Gemma 3 270M (CPU, fp32).

    python benchmarks/train_step_rss.py LABEL [--segments 8] [--batch 2] [--positions 32]

Compare two versions of the code by running it with PYTHONPATH pointing at each one's ``src`` (a git
worktree of the older commit): loss and gradients must be equal, only the peak may differ.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

import gma6
from gma6.training import TrainConfig, _losses, make_batch

ap = argparse.ArgumentParser()
ap.add_argument("label")
ap.add_argument("--segments", type=int, default=8)
ap.add_argument("--batch", type=int, default=2)
ap.add_argument("--positions", type=int, default=32)
args = ap.parse_args()
torch.manual_seed(0)
base, tok = gma6.load_base(progress=False)
mm = gma6.attach_memory(base, gma6.GMA6Config(num_slots=16, memory_dim=128))
cfg = TrainConfig(curriculum=[args.segments], batch_size=args.batch, segment_length=256,
                  lm_positions=args.positions, kl_weight=1.0)
batch = make_batch(cfg, 0, tok, tok.bos_token_id, tok.pad_token_id or 0)
t = time.time()
loss, acc, lm, kl, *_ = _losses(mm, batch, 256, tok.bos_token_id, None, args.positions, kl=True)
(loss + kl).backward()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
g = sum(float(p.grad.abs().sum()) for p in mm.parameters() if p.grad is not None)
print(f"{args.label}: loss {float(loss):.5f} kl {float(kl):.6f} grad-sum {g:.6f} peak RSS {peak:.2f} GiB, {time.time() - t:.0f} s")
