"""Issue 4's "the memory must not hurt the base": perplexity of held-out text, bare vs memory.

Usage: python scripts/perplexity_check.py HELD_OUT.txt UNRELATED.txt [--adapter DIR ...] [--tokens 2048]
    [--model GGUF_OR_DIR] [--device cpu|cuda] [--out results/perplexity-cpu.json]
A fresh (untrained) memory first, then each adapter (default: the shipped one).
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time

import torch

import gma6
from gma6.base import default_adapter
from gma6.io import atomic_write_text
from gma6.perplexity import segment_perplexity

p = argparse.ArgumentParser()
p.add_argument("held_out")
p.add_argument("unrelated")
p.add_argument("--adapter", action="append", help="adapter folder (repeat for several)")
p.add_argument("--tokens", type=int, default=2048)
p.add_argument("--segment-length", type=int, default=256)
p.add_argument("--out", default="results/perplexity-cpu.json")
p.add_argument("--model", default=None, help="base model (default: the embedded Gemma 3 270M)")
p.add_argument("--device", default="cpu", help="the base runs in float32 on this device")
args = p.parse_args()
torch.manual_seed(0)
model, tok = gma6.load_base(args.model, dtype=torch.float32, device=args.device, progress=False)


def ids_of(path: str) -> torch.Tensor:
    text = open(path, encoding="utf-8", errors="replace").read()
    return torch.tensor([tok.encode(text, add_special_tokens=False)[: args.tokens]])


held, other = ids_of(args.held_out), ids_of(args.unrelated)
rows = []
adapters = args.adapter or [str(default_adapter())]
for name, adapter in [("fresh memory", None)] + [(a, a) for a in adapters]:
    mm = gma6.attach_memory(model, gma6.GMA6Config()) if adapter is None else gma6.load_adapter(model, adapter)
    t = time.time()
    with mm.memory_disabled():
        bare = segment_perplexity(mm, held, args.segment_length, tok.bos_token_id)
    lora_only = None
    if getattr(mm.config, "lora_rank", 0):  # the LoRA alone (memory off): what of the cost is the LoRA's
        with mm.memory_disabled(keep_lora=True):
            lora_only = segment_perplexity(mm, held, args.segment_length, tok.bos_token_id)
    mem = segment_perplexity(mm, held, args.segment_length, tok.bos_token_id)
    state = mm.read(other.to(mm.device), segment_length=args.segment_length, bos_token_id=tok.bos_token_id)
    after = segment_perplexity(mm, held, args.segment_length, tok.bos_token_id, memory_state=state)
    mm.detach()
    rows.append({"memory": name, "bare": round(bare, 4), "with_memory": round(mem, 4),
                 "with_memory_after_unrelated": round(after, 4), "ratio": round(mem / bare, 4),
                 "ratio_after_unrelated": round(after / bare, 4),
                 "lora_only": None if lora_only is None else round(lora_only, 4),
                 "ratio_lora_only": None if lora_only is None else round(lora_only / bare, 4),
                 "seconds": round(time.time() - t, 1)})
    print(rows[-1], flush=True)
device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
out = {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "date": time.strftime("%Y-%m-%d"),
       "device": device, "machine": platform.processor() or platform.machine(), "dtype": "float32",
       "held_out": args.held_out, "unrelated": args.unrelated, "tokens": args.tokens,
       "segment_length": args.segment_length, "rows": rows}
atomic_write_text(args.out, json.dumps(out, indent=1) + "\n")
