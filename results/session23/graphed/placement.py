"""Adapters of the default's kind (l1's config, random initial memory) whose first memory layer is later: for timing
the training step against where the backward must reach (session 21)."""
import json
import sys

import torch

import gma6
from gma6.bench import random_model
from gma6.config import GMA6Config

adapter, device = sys.argv[1], sys.argv[2]
base = random_model("benchmarks/gemma3-270m-config.json", torch.bfloat16 if device == "cuda" else torch.float32, device)
cfg = json.load(open(f"{adapter}/gma6_config.json"))
for first in map(int, sys.argv[3:]):
    c = GMA6Config.from_dict({**cfg, "layers": list(range(first, 17))}) if hasattr(GMA6Config, "from_dict") else None
    mm = gma6.attach_memory(base, c)
    print(first, mm.save_pretrained(f"/tmp/a{first}"), sum(p.numel() for p in mm.memory_parameters()))
    base = mm.detach()
