#!/usr/bin/env python
"""A saved adapter without its read-query adapters (``read_query="none"``): the slots' key and value adapters and
everything else kept. The read then does no work at every token beyond the base's own queries (the fast path of
``read_site="attention"``); what it answers is measured, not assumed (a start for training that kind).

    python scripts/drop_read_query.py --adapter DIR --out DIR2
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from safetensors.torch import load_file, save_file

from gma6.config import GMA6Config
from gma6.io import atomic_write, atomic_write_text

WEIGHTS = "memory_adapter.safetensors"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapter", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args(argv)
    config = GMA6Config.load(args.adapter)
    if not config.read_rank or config.read_query == "none":
        raise SystemExit(f"{args.adapter} has no read-query adapter (read_rank={config.read_rank}, "
                         f"read_query={config.read_query!r})")
    tensors = {k: v for k, v in load_file(args.adapter / WEIGHTS).items() if ".read_q." not in k}
    config.read_query = "none"
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out / WEIGHTS, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, tmp))
    config.save(args.out)
    record = {"command": "python " + shlex.join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])]),
              "date": time.strftime("%Y-%m-%d"), "from": str(args.adapter)}
    atomic_write_text(args.out / "conversion.json", json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
