#!/usr/bin/env python
"""How far apart two saved adapters are, tensor by tensor: the same config is required, then the largest absolute
difference of each weight (memory and LoRA files) relative to its own scale. For checking that two ways of training
(e.g. one process against several under torchrun, the same global batch) gave the same adapter.

    python scripts/compare_adapters.py --a DIR --b DIR [--atol 1e-4] [--out results/x.json]

Exits 1 when a difference exceeds ``--atol`` (relative to the tensor's largest magnitude), 2 when they cannot be
compared (another config, other tensors).
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from safetensors.torch import load_file

from gma6.config import GMA6Config
from gma6.io import atomic_write_text

FILES = ("memory_adapter.safetensors", "lora_adapter.safetensors")


def compare(a: Path, b: Path) -> dict[str, float]:
    """``{file/tensor: max |a - b| / max |a|}`` over every tensor of both adapters' weight files."""
    if GMA6Config.load(a).to_dict() != GMA6Config.load(b).to_dict():
        raise ValueError(f"{a} and {b} have different configs (gma6_config.json)")
    out: dict[str, float] = {}
    for name in FILES:
        fa, fb = a / name, b / name
        if not fa.exists() and not fb.exists():
            continue
        if fa.exists() != fb.exists():
            raise ValueError(f"{name} is in only one of {a}, {b}")
        ta, tb = load_file(str(fa)), load_file(str(fb))
        if ta.keys() != tb.keys():
            raise ValueError(f"{name}: the two hold different tensors ({sorted(ta.keys() ^ tb.keys())[:4]} ...)")
        for k in sorted(ta):
            x, y = ta[k].float(), tb[k].float()
            if x.shape != y.shape:
                raise ValueError(f"{name}:{k}: shapes {tuple(x.shape)} and {tuple(y.shape)}")
            scale = float(x.abs().max()) or 1.0
            out[f"{name}:{k}"] = float((x - y).abs().max()) / scale
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--a", required=True, type=Path)
    ap.add_argument("--b", required=True, type=Path)
    ap.add_argument("--atol", type=float, default=1e-4)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    try:
        diffs = compare(args.a, args.b)
    except (OSError, ValueError) as e:
        print(f"compare_adapters: {e}", file=sys.stderr)
        raise SystemExit(2) from e
    worst = max(diffs, key=diffs.get) if diffs else None
    result = {"command": "python " + shlex.join(sys.argv), "date": time.strftime("%Y-%m-%d"), "a": str(args.a),
              "b": str(args.b), "tensors": len(diffs), "max_relative_difference": diffs.get(worst, 0.0),
              "worst": worst, "atol": args.atol, "within": all(v <= args.atol for v in diffs.values())}
    print(json.dumps(result, indent=1))
    if args.out is not None:
        atomic_write_text(args.out, json.dumps({**result, "by_tensor": diffs}, indent=1) + "\n")
    raise SystemExit(0 if result["within"] else 1)


if __name__ == "__main__":
    main()
