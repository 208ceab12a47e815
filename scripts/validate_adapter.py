#!/usr/bin/env python
"""Teacher-forced answer accuracy of a saved adapter on test samples (``gma6.training.validate``):
the quick check, not ``gma6 eval``'s benchmark. ``--in-context``: the whole context in the base's
window with the adapter's LoRA on and its memory off (the ceiling runs of ``gma6 train --in-context``).

    python scripts/validate_adapter.py --model M --adapter DIR --lengths 1k,4k --n 100 [--in-context] --out F
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time

import torch

import gma6
from gma6.data.generator import parse_length
from gma6.io import atomic_write_text
from gma6.training import validate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--tasks", default="qa1,qa2,qa3,qa4,qa5")
    ap.add_argument("--lengths", default="1k,4k")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--segment-length", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--in-context", action="store_true")
    ap.add_argument("--question-reads", type=int, default=0, help="as gma6 train/eval --question-reads")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    base, tok = gma6.load_base(args.model, dtype=dtype, device=args.device, progress=False)
    mm = gma6.load_adapter(base, args.adapter)
    mm.eval()
    rows = []
    for length in args.lengths.split(","):
        t0 = time.perf_counter()
        acc = validate(mm, tok, args.tasks.split(","), parse_length(length), args.n, args.segment_length,
                       batch_size=args.batch_size, in_context=args.in_context, question_reads=args.question_reads)
        for task, a in acc.items():
            rows.append({"task": task, "length": length, "n": args.n, "accuracy": round(a, 4)})
        print(length, {k: round(v, 3) for k, v in acc.items()}, f"{time.perf_counter() - t0:.0f}s", flush=True)
    result = {"command": "python " + shlex.join(sys.argv), "date": time.strftime("%Y-%m-%d"),
              "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
              "adapter": args.adapter, "in_context": args.in_context,
              "scoring": "teacher-forced: every answer token right (gma6.training.validate)", "rows": rows}
    atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
