"""Structured text for the training's KL term: Python's own source files, read verbatim.

The stories' filler is prose with everything code-like removed, so a memory trained on stories
alone never sees markup, code or URLs, and that is where it disturbs the base most: on the
held-out README, ten markup tokens of 2048 carried half of the shipped adapter's perplexity cost
(``results/perplexity-tokens-cpu-a13.json``). Rows of this text, read segment by segment with the
memory carried, give the KL term to the bare base those kinds of tokens.

It ships with the running interpreter (nothing to download): the standard library's ``.py`` files
(code, comments, docstrings with reStructuredText and URLs) in sorted path order, tests and
vendored packages left out, then the language reference's topics (``pydoc_data``) verbatim, code
samples included. A row joins stretches from unrelated places, so the memory also learns to
stay harmless when what it holds has nothing to do with what it reads. It is kept apart from the texts perplexity is measured on (packages'
metadata and licences under site-packages), which never come from here.
"""

from __future__ import annotations

import functools
import random
import sysconfig
from pathlib import Path
from typing import Any

import torch

from .distractor import STDLIB_SKIP_DIRS, stdlib_py_files

# Folders of the standard library that are tests, demos or copies of third-party packages (the
# filler corpus's list, and unittest's own machinery).
SKIP_DIRS = STDLIB_SKIP_DIRS | {"unittest"}

# Characters read per token wanted: code runs 3-4 characters a token; the rest is cut off.
_CHARS_PER_TOKEN = 6


@functools.lru_cache(maxsize=1)
def stdlib_sources() -> tuple[Path | str, ...]:
    """The standard library's ``.py`` files, sorted, then the reference topics' texts; raises if
    the interpreter ships no sources."""
    files = [f for f in stdlib_py_files(SKIP_DIRS) if f.stat().st_size > 2000]  # stubs and one-liners teach nothing
    if not files:
        root = sysconfig.get_paths().get("stdlib")
        raise RuntimeError(f"no standard-library sources under {root!r}: this interpreter ships none "
                           "(the structured-text KL term needs them)")
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip it
        topics = {}
    return (*files, *(topics[k] for k in sorted(topics) if len(topics[k]) > 2000))


def _read(doc: Path | str) -> str:
    return doc.read_text(encoding="utf-8", errors="replace") if isinstance(doc, Path) else doc


def text_rows(tokenizer: Any, rows: int, n_tokens: int, seed: int, pieces: int = 2) -> torch.Tensor:
    """``rows`` rows of ``n_tokens`` tokens of standard-library source, (rows, n_tokens).

    A row is ``pieces`` stretches of consecutive tokens, each from a line of a document chosen by
    ``seed`` (a pure function of it, for a given Python), running on into the next documents when
    one ends.
    """
    if rows <= 0 or n_tokens <= 0 or pieces <= 0:
        raise ValueError(f"rows={rows}, n_tokens={n_tokens}, pieces={pieces}: expected positive ints")
    docs = stdlib_sources()
    rng = random.Random(seed)
    out = []
    for _ in range(rows):
        ids: list[int] = []
        for k in range(pieces):
            want = n_tokens * (k + 1) // pieces - len(ids)
            i = rng.randrange(len(docs))
            text = _read(docs[i])
            start = text.rfind("\n", 0, rng.randrange(len(text))) + 1  # from the start of a line
            piece: list[int] = []
            for _ in range(len(docs) + 1):  # at most every document once more
                piece.extend(tokenizer.encode(text[start : start + (want - len(piece)) * _CHARS_PER_TOKEN],
                                              add_special_tokens=False))
                if len(piece) >= want:
                    break
                i, start = i + 1, 0
                text = _read(docs[i % len(docs)])
            else:  # the tokenizer gives (almost) nothing
                raise ValueError(f"the tokenizer made {len(piece)} tokens of {len(docs)} documents, {want} wanted")
            ids.extend(piece[:want])
        out.append(ids)
    return torch.tensor(out, dtype=torch.long)
