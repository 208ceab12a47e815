#!/usr/bin/env python
"""Measure the design's system options on one machine, against fp32 in the same process.

For each variant the same adapter answers the same generated samples (``gma6.evaluate``), and the
row records accuracy, agreement of the greedy answers with fp32, wall time, peak accelerator memory
and the base's parameter bytes; then a training step with and without gradient checkpointing.

    python benchmarks/options_check.py --model M.gguf --adapter DIR --out results/options-h100.json

Variants: fp32; use_half_precision (bf16 base, fp32 memory); use_4bit_quantization (NF4 base,
CUDA + bitsandbytes only: skipped with the reason otherwise); offload_to_cpu; max_memory_usage
(a budget the read must fit).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import time
from pathlib import Path
from typing import Any

import torch

import gma6
from gma6.base import default_adapter
from gma6.evaluation import answer_text, evaluate
from gma6.io import atomic_write_text
from gma6.options import parameter_bytes


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if device.type == "cuda" else None


def _answers(result: dict[str, Any]) -> dict[tuple, tuple[str, bool]]:
    """Per sample: the answer's first word (what the scorer looks at first) and whether it scored."""
    def word(text: str) -> str:
        words = re.findall(r"[a-z]+", answer_text(text).lower())
        return words[0] if words else ""
    return {(o["task"], o["length"], o["index"]): (word(o["output"]), o["correct"]) for o in result["outputs"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--adapter", default=str(default_adapter()))
    ap.add_argument("--tasks", default="qa1,qa2,qa3,qa4,qa5")
    ap.add_argument("--length", default="1k")
    ap.add_argument("--samples", type=int, default=20)
    ap.add_argument("--segment-length", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--train-only", action="store_true", help="only the training-step rows")
    ap.add_argument("--train-batch", type=int, default=8, help="samples in the training-step rows (4 segments each)")
    args = ap.parse_args()
    device = torch.device(args.device)
    tasks = args.tasks.split(",")
    rows: list[dict[str, Any]] = []
    reference: dict[tuple, str] | None = None

    def save() -> None:  # after every row: a run stopped by a time limit keeps what it measured
        result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                  "date": dt.date.today().isoformat(), "adapter": args.adapter, "length": args.length,
                  "samples_per_task": args.samples, "segment_length": args.segment_length, "tasks": tasks,
                  "command": "python benchmarks/options_check.py " + " ".join(
                      f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v not in (None, False)),
                  "rows": rows}
        atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")

    def run(name: str, load: dict[str, Any], overrides: dict[str, Any]) -> None:
        nonlocal reference
        row: dict[str, Any] = {"variant": name, **{k: str(v) for k, v in load.items()}, **overrides}
        try:
            _peak_reset(device)
            base, tok = gma6.load_base(args.model, progress=False, **load)
            mm = gma6.load_adapter(base, args.adapter, **overrides)
            t = time.perf_counter()
            r = evaluate(mm, tok, tasks, [args.length], args.samples, segment_length=args.segment_length,
                         systems=("memory",), batch_size=args.batch_size, progress=False)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            answers = _answers(r)
            reference = reference or answers
            same = sum(answers[k][0] == reference[k][0] for k in reference)
            same_score = sum(answers[k][1] == reference[k][1] for k in reference)
            row.update(accuracy=round(sum(x["correct"] for x in r["rows"]) / sum(x["n"] for x in r["rows"]), 4),
                       same_first_word_as_fp32=round(same / len(reference), 4),
                       same_score_as_fp32=round(same_score / len(reference), 4), seconds=round(time.perf_counter() - t, 2),
                       peak_gib=_peak_gib(device), base_param_gib=round(parameter_bytes(base) / 2**30, 3))
            mm.detach()
            del mm, base
        except (ImportError, RuntimeError, ValueError) as e:
            row["skipped"] = f"{type(e).__name__}: {e}"
        rows.append(row)
        save()
        print(json.dumps(row), flush=True)

    variants = [
        ("fp32", {"dtype": torch.float32, "device": device}, {}),
        ("use_half_precision", {"dtype": torch.bfloat16, "device": device}, {"use_half_precision": True}),
        ("use_4bit_quantization", {"dtype": torch.bfloat16, "load_in_4bit": True, "device": device}, {"use_4bit_quantization": True}),
        ("offload_to_cpu", {"dtype": torch.float32, "device": device}, {"offload_to_cpu": True}),
        ("max_memory_usage", {"dtype": torch.float32, "device": device}, {"max_memory_usage": 8.0}),
    ]
    for name, load, overrides in [] if args.train_only else variants:
        run(name, load, overrides)

    # Training step: peak memory with and without gradient checkpointing (same batch, bf16 base),
    # then on a 4-bit base (memory trainable on top): loss before and after one AdamW step.
    from gma6.training import TrainConfig, answer_loss, make_batch

    half = torch.bfloat16 if device.type == "cuda" else torch.float32
    variants = [("train_step", {"dtype": half, "device": device}, {"gradient_checkpointing": False}),
                ("train_step", {"dtype": half, "device": device}, {"gradient_checkpointing": True}),
                ("train_step_4bit", {"dtype": torch.bfloat16, "load_in_4bit": True, "device": device}, {"use_4bit_quantization": True})]
    cfg = TrainConfig(curriculum=[4], batch_size=args.train_batch, segment_length=args.segment_length)
    for name, load, overrides in variants:
        row = {"variant": name, **overrides}
        try:
            base, tok = gma6.load_base(args.model, progress=False, **load)
            batch = make_batch(cfg, 0, tok, tok.bos_token_id, tok.pad_token_id or 0).to(device)
            mm = gma6.load_adapter(base, args.adapter, **overrides)
            mm.train()
            opt = torch.optim.AdamW([p for p in mm.parameters() if p.requires_grad], lr=1e-3)
            _peak_reset(device)
            t = time.perf_counter()
            loss, _ = answer_loss(mm, batch, cfg.segment_length, tok.bos_token_id)
            loss.backward()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - t
            grads = [p.grad.detach().flatten() for p in mm.parameters() if p.requires_grad and p.grad is not None]
            opt.step()
            with torch.no_grad():
                after, _ = answer_loss(mm, batch, cfg.segment_length, tok.bos_token_id)
            row.update(seconds=round(seconds, 3), peak_gib=_peak_gib(device), loss=round(float(loss.detach()), 5),
                       loss_after_one_step=round(float(after), 5), grad_norm=round(float(torch.cat(grads).norm()), 6),
                       trainable=sum(p.numel() for p in mm.parameters() if p.requires_grad))
            mm.detach()
            del mm, base, opt
        except (ImportError, RuntimeError, ValueError) as e:
            row["skipped"] = f"{type(e).__name__}: {e}"
        rows.append(row)
        save()
        print(json.dumps(row), flush=True)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
