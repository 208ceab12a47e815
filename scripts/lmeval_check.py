#!/usr/bin/env python
"""lm-evaluation-harness with the memory model: word perplexity of local documents, memory on vs off.

    python scripts/lmeval_check.py TEXT_FILE [--adapter DIR] [--docs 3] [--doc-tokens 1500]
        [--segment-length 256] [--out results/lmeval-cpu.json]

The text is cut into documents of ``--doc-tokens`` tokens (a local ``json`` dataset: no hub), each
scored by ``loglikelihood_rolling`` through ``gma6.harness.GMA6LM``: read in windows of the segment
length with the memory carried (``use_memory=True``), and by the bare base on the same windows.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import lm_eval
import torch

import gma6
from gma6.base import default_adapter
from gma6.harness import GMA6LM
from gma6.io import atomic_write_text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("text")
    ap.add_argument("--adapter", default=str(default_adapter()))
    ap.add_argument("--docs", type=int, default=3)
    ap.add_argument("--doc-tokens", type=int, default=1500)
    ap.add_argument("--segment-length", type=int, default=256)
    ap.add_argument("--out", default="results/lmeval-cpu.json")
    args = ap.parse_args()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    torch.manual_seed(0)
    base, tok = gma6.load_base(progress=False)
    ids = tok.encode(Path(args.text).read_text(encoding="utf-8", errors="replace"), add_special_tokens=False)
    docs = [tok.decode(ids[i * args.doc_tokens:(i + 1) * args.doc_tokens]) for i in range(args.docs)]
    if not docs[-1]:
        raise SystemExit(f"{args.text}: fewer than {args.docs} x {args.doc_tokens} tokens")
    mm = gma6.load_adapter(base, args.adapter)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "docs.jsonl"
        data.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
        task = {"task": "gma6_local_rolling", "dataset_path": "json", "test_split": "test",
                "dataset_kwargs": {"data_files": {"test": str(data)}}, "output_type": "loglikelihood_rolling",
                "doc_to_text": "", "doc_to_target": "{{text}}",
                "metric_list": [{"metric": "word_perplexity"}, {"metric": "bits_per_byte"}]}
        for use_memory in (False, True):
            t = time.time()
            lm = GMA6LM(mm, tok, segment_length=args.segment_length, use_memory=use_memory)
            res = lm_eval.simple_evaluate(model=lm, tasks=[task], bootstrap_iters=0)["results"]["gma6_local_rolling"]
            rows.append({"use_memory": use_memory, "word_perplexity": round(res["word_perplexity,none"], 4),
                         "bits_per_byte": round(res["bits_per_byte,none"], 5), "seconds": round(time.time() - t, 1)})
            print(json.dumps(rows[-1]), flush=True)
    out = {"command": "python " + shlex.join(sys.argv), "date": time.strftime("%Y-%m-%d"), "device": "cpu",
           "machine": platform.machine(), "dtype": "float32", "lm_eval": lm_eval.__version__, "adapter": args.adapter,
           "docs": args.docs, "doc_tokens": args.doc_tokens, "segment_length": args.segment_length, "rows": rows}
    atomic_write_text(args.out, json.dumps(out, indent=1) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
