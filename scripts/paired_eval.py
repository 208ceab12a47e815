#!/usr/bin/env python
"""Paired difference of two adapters' `gma6 eval` answers on the same test samples (same --seed sets): the mean
over tasks of A and of B, and A - B in points with its 95 % interval over the samples (each sample right or wrong
for both, so the interval is far tighter than two independent ones).

    python scripts/paired_eval.py --a h1-s4.json h1-s5.json --b b1-s4.json b1-s5.json [--name h1-b1] --out F
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


def _answers(files: list[str]) -> dict[tuple, bool]:
    out: dict[tuple, bool] = {}
    for f in files:
        data = json.loads(Path(f).read_text())
        for o in data["outputs"]:
            key = (o["task"], o["length"], o["seed"])
            if key in out:
                raise SystemExit(f"{f}: sample {key} seen twice (sets must not share samples)")
            out[key] = bool(o["correct"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--a", nargs="+", required=True)
    ap.add_argument("--b", nargs="+", required=True)
    ap.add_argument("--name", default="a-b")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    a, b = _answers(args.a), _answers(args.b)
    if a.keys() != b.keys():
        raise SystemExit(f"the two sides hold different samples ({len(a)} vs {len(b)}; {len(a.keys() ^ b.keys())} differ)")
    tasks = sorted({k[0] for k in a})
    per_task = {t: [k for k in a if k[0] == t] for t in tasks}
    diffs = [int(a[k]) - int(b[k]) for k in a]
    n = len(diffs)
    mean = sum(diffs) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    result = {
        "command": "python " + shlex.join(sys.argv), "date": time.strftime("%Y-%m-%d"), "name": args.name, "samples": n,
        "a_mean": round(100 * sum(a.values()) / n, 2), "b_mean": round(100 * sum(b.values()) / n, 2),
        "a_by_task": {t: round(100 * sum(a[k] for k in ks) / len(ks), 2) for t, ks in per_task.items()},
        "b_by_task": {t: round(100 * sum(b[k] for k in ks) / len(ks), 2) for t, ks in per_task.items()},
        "a_minus_b_points": round(100 * mean, 2), "ci95_points": round(196 * sd / math.sqrt(n), 2),
    }
    print(json.dumps(result))
    atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
