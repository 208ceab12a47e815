#!/usr/bin/env python
"""What the wrong qa1 answers are, from a ``gma6 eval`` result with outputs (same test samples rebuilt).

    python scripts/qa1_errors.py results/sidebyside-h100.json --out results/qa1-errors-h100.json

Each qa1 answer is classed by the first place word it names: right; an earlier place of the person
asked about (recency fails); another person's place (binding fails); a place not in the story; none.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
from pathlib import Path

from gma6.data import generate_samples
from gma6.data.vocab import PLACES
from gma6.data.generator import parse_length
from gma6.io import atomic_write_text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("result", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--lengths", default="1k,2k,4k,8k")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    from gma6.base import default_checkpoint

    tok = AutoTokenizer.from_pretrained(default_checkpoint(progress=False))
    run = json.loads(args.result.read_text())
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for length in args.lengths.split(","):
        n = run["samples"][length]
        samples = generate_samples("qa1", parse_length(length), n, split="test", seed=run["seed"], tokenizer=tok)
        for o in run["outputs"]:
            if o["task"] != "qa1" or o["length"] != length:
                continue
            s = samples[o["index"]]
            low = o["output"].lower()
            hits = sorted((low.index(p), p) for p in PLACES if p in low)
            said = hits[0][1] if hits else None
            person = s.question.rstrip("?").split()[-1]
            own = [p for f in s.facts if f.split()[0] == person for p in PLACES if p in f]
            others = [p for f in s.facts if f.split()[0] != person for p in PLACES if p in f]
            if o["correct"]:
                kind = "right"
            elif said is None:
                kind = "no place"
            elif said in own[:-1]:
                kind = "an earlier place of that person"
            elif said in others:
                kind = "another person's place"
            elif said in own:
                kind = "the right place, scored wrong"
            else:
                kind = "a place not in the story"
            counts[o["system"]][kind] += 1
    result = {
        "source": str(args.result), "lengths": args.lengths.split(","), "date": datetime.date.today().isoformat(),
        "command": "python scripts/qa1_errors.py " + " ".join(f"{a}" for a in [args.result, "--out", args.out]),
        "systems": {k: {"n": sum(c.values()), **{kind: round(v / sum(c.values()), 3) for kind, v in c.most_common()}}
                    for k, c in counts.items()},
    }
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    for k, v in result["systems"].items():
        print(k, v)


if __name__ == "__main__":
    main()
