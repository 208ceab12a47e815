#!/usr/bin/env python
"""Pool one system's `gma6 eval` results over several sets of test samples (different --seed): per-task
accuracy over all samples, the mean over tasks with its 95 % interval, and each set's own mean.

    python scripts/pool_eval.py FILE[@SYSTEM] ... [--length 4k] --out results/NAME.json

FILE@SYSTEM picks one system of a file holding several (e.g. results/eval-4k-n500-h200.json@b1-memory-alone);
without it the file must hold one system at that length. Sets must not share samples (different seeds).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from gma6.io import atomic_write_text  # noqa: E402


def _cells(spec: str, length: str) -> tuple[str, dict[str, tuple[int, int]], int | None]:
    path, _, system = spec.partition("@")
    data = json.loads(Path(path).read_text())
    rows = [r for r in data["rows"] if r["length"] == length and (not system or r["system"] == system)]
    systems = {r["system"] for r in rows}
    if len(systems) != 1:
        raise SystemExit(f"{spec}: expected one system at {length}, found {sorted(systems) or 'none'} (use FILE@SYSTEM)")
    return path, {r["task"]: (r["correct"], r["n"]) for r in rows}, data.get("seed")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--length", default="4k")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    sets, total = [], {}
    for spec in args.files:
        path, cells, seed = _cells(spec, args.length)
        sets.append({"file": spec, "seed": seed, "n_per_task": {t: n for t, (_, n) in cells.items()},
                     "mean": round(100 * sum(c / n for c, n in cells.values()) / len(cells), 2)})
        for task, (c, n) in cells.items():
            acc = total.setdefault(task, [0, 0])
            acc[0] += c
            acc[1] += n
    seeds = [s["seed"] for s in sets]
    if len(set(seeds)) != len(seeds):
        raise SystemExit(f"two sets share a seed ({seeds}): their samples overlap")
    tasks = sorted(total)
    p = {t: total[t][0] / total[t][1] for t in tasks}
    mean = sum(p.values()) / len(tasks)
    half = 1.96 * math.sqrt(sum(p[t] * (1 - p[t]) / total[t][1] for t in tasks)) / len(tasks)
    result = {
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "date": time.strftime("%Y-%m-%d"),
        "length": args.length, "sets": sets,
        "by_task": {t: {"accuracy": round(100 * p[t], 2), "correct": total[t][0], "n": total[t][1]} for t in tasks},
        "mean": round(100 * mean, 2), "mean_95_halfwidth": round(100 * half, 2),
    }
    print(json.dumps({k: result[k] for k in ("by_task", "mean", "mean_95_halfwidth")}, indent=1))
    atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
