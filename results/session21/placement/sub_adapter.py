"""l1 restricted to its memory layers FIRST..16, each layer's trained weights kept (slot j <- l1's slot FIRST + j):
the starting point of a memory that reads higher up (session 21). usage: sub_adapter.py L1_DIR FIRST OUT_DIR"""
import json
import sys

import torch
from safetensors.torch import load_file

import gma6
from gma6.bench import random_model
from gma6.config import GMA6Config

src, first, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
cfg = json.load(open(f"{src}/gma6_config.json"))
layers = [x for x in cfg["layers"] if x >= first]
weights = load_file(f"{src}/memory_adapter.safetensors")
mm = gma6.attach_memory(random_model("benchmarks/gemma3-270m-config.json", torch.float32, "cpu"),
                        GMA6Config.from_dict({**cfg, "layers": layers}))
old_slot = {j: cfg["layers"].index(layer) for j, layer in enumerate(layers)}
mapped = {}
for key in mm.controller.state_dict():
    _, j, rest = key.split(".", 2)
    mapped[key] = weights[f"layers.{old_slot[int(j)]}.{rest}"]
missing = mm.controller.load_state_dict(mapped, strict=True)
print(layers, mm.save_pretrained(out), sum(p.numel() for p in mm.memory_parameters()))
