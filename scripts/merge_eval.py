#!/usr/bin/env python
"""Merge ``gma6 eval`` results of systems run side by side (same samples) into one JSON + plot.

    python scripts/merge_eval.py A.json B.json C.json@memory-g2 --out results --name NAME

Used when base and memory systems were evaluated in parallel processes on one GPU. ``PATH@LABEL``
renames that run's memory system (two adapters of one kind are both called "memory" otherwise).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from gma6.evaluation import format_table, merge_results, save_results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="+", help="result JSON files, each optionally PATH@LABEL")
    ap.add_argument("--out", type=Path, default=Path("results"))
    ap.add_argument("--name", required=True)
    args = ap.parse_args()
    runs = []
    for spec in args.results:
        path, _, label = str(spec).partition("@")
        run = json.loads(Path(path).read_text())
        if label:
            suffix = "_other_context"  # the control of the same adapter keeps its suffix
            mems = [s for s in run.get("systems", []) if not s.startswith("base_")]
            own = [s for s in mems if not s.endswith(suffix)]
            if len(own) > 1 or not mems:
                raise SystemExit(f"{path}: @{label} needs exactly one memory system in the run, found {mems}")
            names = {s: label + suffix if s.endswith(suffix) else label for s in mems}
            run["systems"] = [names.get(s, s) for s in run["systems"]]
            for row in run["rows"] + run.get("outputs", []):
                row["system"] = names.get(row["system"], row["system"])
            for a in run.get("adapters", []):
                a["system"] = names.get(a["system"], a["system"])
        runs.append(run)
    merged = merge_results(runs)
    for path in save_results(merged, args.out, args.name).values():
        print("wrote", path)
    print(format_table(merged))


if __name__ == "__main__":
    main()
