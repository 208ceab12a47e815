#!/usr/bin/env python
"""The training rows of several ``gma6 bench`` results (one a training context) in one figure: step time and peak
memory against the context, for the memory-only step, the full fine-tune over the same segments and the full
fine-tune reading the whole context; and their ratios. No GPU needed: it reads the JSON files.

    python benchmarks/train_contexts.py results/session23/context/train-ctx-*.json \
        --out results/session23/context/train-vs-context

Writes OUT.json ({"command", "date", "sources", "machines", "rows": [{"context", "<system>_s", "<system>_gib", ...}],
"ratios"}) and OUT.png.
Where several files hold the same context (reruns), the fastest step of each system is kept, with its own peak.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import sys
from pathlib import Path
from typing import Any

from gma6.io import atomic_write, atomic_write_text

SHOWN = ("train_memory", "train_full", "train_full_context")
LABELS = {"train_memory": "memory-only (frozen base)", "train_full": "full fine-tune, same segments",
          "train_full_context": "full fine-tune, whole context"}


def collect(paths: list[Path]) -> dict[str, Any]:
    """Per context, each shown system's fastest step and its peak, and memory-only's ratios against the others."""
    best: dict[int, dict[str, dict[str, Any]]] = {}
    machines = set()
    for path in paths:
        data = json.loads(Path(path).read_text())
        machines.add(str(data.get("device_name") or data.get("device")))
        for r in data["rows"]:
            if r["system"] in SHOWN and r.get("status") == "ok":
                kept = best.setdefault(r["context"], {}).get(r["system"])
                if kept is None or r["seconds"] < kept["seconds"]:
                    best.setdefault(r["context"], {})[r["system"]] = r
    if not best:
        raise ValueError(f"no training rows with status ok in {[str(p) for p in paths]}")
    rows, ratios = [], []
    for ctx in sorted(best):
        got = best[ctx]
        rows.append({"context": ctx, **{f"{s}_s": got[s]["seconds"] for s in SHOWN if s in got},
                     **{f"{s}_gib": got[s]["peak_mem_gib"] for s in SHOWN if s in got}})
        mem = got.get("train_memory")
        for other in SHOWN[1:]:
            if mem is not None and other in got:
                ratios.append({"context": ctx, "against": other,
                               "faster": round(got[other]["seconds"] / mem["seconds"], 3),
                               "leaner": round(got[other]["peak_mem_gib"] / mem["peak_mem_gib"], 3)})
    return {"sources": [str(p) for p in paths], "machines": sorted(machines), "rows": rows, "ratios": ratios}


def plot(result: dict[str, Any], png: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = {"train_memory": "tab:red", "train_full": "tab:gray", "train_full_context": "tab:blue"}
    for ax, unit, name in ((axes[0], "s", "seconds a step"), (axes[1], "gib", "peak GiB")):
        for s in SHOWN:
            pts = [(r["context"], r[f"{s}_{unit}"]) for r in result["rows"] if f"{s}_{unit}" in r]
            if pts:
                ax.plot(*zip(*pts), marker="o", color=colors[s], label=LABELS[s])
        ax.set_xscale("log", base=2)
        ax.set_xlabel("training context (tokens)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    try:
        return atomic_write(png, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    finally:
        plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+", type=Path, help="gma6 bench results with training rows")
    ap.add_argument("--out", type=Path, required=True, help="writes OUT.json and OUT.png")
    ap.add_argument("--title", default="training step against the context (gma6 bench rows)")
    args = ap.parse_args(argv)
    words = ["benchmarks/train_contexts.py", *(argv if argv is not None else sys.argv[1:])]
    result = {"command": "python " + " ".join(map(shlex.quote, words)), "date": dt.date.today().isoformat(),
              **collect(args.files)}
    atomic_write_text(args.out.with_suffix(".json"), json.dumps(result, indent=2) + "\n")
    plot(result, args.out.with_suffix(".png"), args.title)
    return result


if __name__ == "__main__":
    main()
