#!/usr/bin/env python
"""What the wrong qa2 / qa3 answers are, from ``gma6 eval`` results with outputs (stories rebuilt from the seeds).

    python scripts/chain_errors.py results/eval-4k-n500-h200.json --systems a16-memory-alone,b1-memory-alone \
        --out results/chain-errors-h200.json

Each wrong answer is classed by its first word: the place of the story's last move (recency); another place
of a person in the supporting facts (the chain half followed); the place of someone else (binding fails);
no place of the story. Accuracy is also split by the story's number of facts and by how many facts
stand between the first supporting fact and the end of the story.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import re
from pathlib import Path

from gma6.data import generate_sample
from gma6.io import atomic_write_text

_MOVE = re.compile(r"(\w+) \w+ to the (\w+)\.")


def classify(facts: list[str], supporting: tuple[int, ...], answer: str) -> str:
    """The error class of a wrong ``answer`` (its first word) about a story with these facts."""
    moves = [m.groups() for m in map(_MOVE.fullmatch, facts) if m]
    people = {facts[i].split()[0] for i in supporting}
    if moves and answer == moves[-1][1]:
        return "last move of the story"
    if answer in {place for who, place in moves if who in people}:
        return "another place of a supporting person"
    if answer in {place for _, place in moves}:
        return "someone else's place"
    return "no place of the story"


def bucket(counts: dict, key: int, correct: bool) -> None:
    hit, n = counts.get(key, (0, 0))
    counts[key] = (hit + int(correct), n + 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("result", type=Path)
    ap.add_argument("--systems", required=True, help="comma-separated system names of the result file")
    ap.add_argument("--tasks", default="qa2,qa3")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    run = json.loads(args.result.read_text())
    split = run.get("split", "test")
    rows = []
    for system in args.systems.split(","):
        for task in args.tasks.split(","):
            outs = [o for o in run["outputs"] if o["system"] == system and o["task"] == task]
            if not outs:
                raise SystemExit(f"{args.result}: no outputs of {system} on {task}")
            classes: collections.Counter = collections.Counter()
            by_facts: dict = {}
            by_distance: dict = {}
            for o in outs:
                # the story depends on the seed only; length 0 skips the filler
                s = generate_sample(task, 0, o["seed"], split=split)
                if s.target != o["target"]:
                    raise SystemExit(f"seed {o['seed']}: rebuilt target {s.target!r} != {o['target']!r}")
                bucket(by_facts, len(s.facts) // 4 * 4, o["correct"])
                bucket(by_distance, (len(s.facts) - 1 - min(s.supporting)) // 3 * 3, o["correct"])
                if not o["correct"]:
                    words = re.findall(r"[a-z]+", o["output"].lower())
                    classes[classify(s.facts, s.supporting, words[0] if words else "")] += 1
            wrong = sum(classes.values())
            rows.append({
                "system": system, "task": task, "n": len(outs), "accuracy": round(1 - wrong / len(outs), 4),
                "wrong_by_class": dict(classes.most_common()),
                "accuracy_by_facts_from": {k: [round(h / n, 3), n] for k, (h, n) in sorted(by_facts.items())},
                "accuracy_by_facts_after_first_support_from": {k: [round(h / n, 3), n]
                                                               for k, (h, n) in sorted(by_distance.items())},
            })
            print(system, task, rows[-1]["accuracy"], rows[-1]["wrong_by_class"])
    out = {"source": str(args.result), "date": datetime.date.today().isoformat(),
           "command": "python scripts/chain_errors.py " + " ".join(
               [str(args.result), "--systems", args.systems, "--tasks", args.tasks, "--out", str(args.out)]),
           "rows": rows}
    atomic_write_text(args.out, json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
