"""Structured text for the KL term: verbatim standard-library source, a pure function of the seed."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest
import torch

from gma6.data.structured import SKIP_DIRS, stdlib_sources, text_rows

from wordtok import WordTokenizer

TOK = WordTokenizer(128)


def test_sources_are_the_standard_library_without_tests_or_site_packages():
    docs = stdlib_sources()
    files = [d for d in docs if isinstance(d, Path)]
    root = sysconfig.get_paths()["stdlib"]
    assert len(files) > 100
    assert all(str(f).startswith(root) and f.suffix == ".py" for f in files)
    assert not any(set(f.relative_to(root).parts[:-1]) & SKIP_DIRS for f in files)
    assert len(set(files)) == len(files)
    assert all(isinstance(d, str) and len(d) > 2000 for d in docs[len(files):])  # the reference's topics


def test_rows_have_the_asked_shape_and_are_a_pure_function_of_the_seed():
    a = text_rows(TOK, 3, 200, seed=5)
    assert a.shape == (3, 200) and a.dtype == torch.long
    assert torch.equal(a, text_rows(TOK, 3, 200, seed=5))
    assert not torch.equal(a, text_rows(TOK, 3, 200, seed=6))
    assert len({tuple(r.tolist()) for r in a}) == 3  # rows come from different places


def test_rows_are_code_tokenised_verbatim():
    class Chars:  # one token per character: the rows must read as Python source
        def encode(self, text, add_special_tokens=False):
            return [ord(c) for c in text]

    rows = text_rows(Chars(), 4, 600, seed=1)
    texts = ["".join(map(chr, r.tolist())) for r in rows]
    assert any(("def " in t or "import " in t or "class " in t) for t in texts)
    assert all("\n" in t for t in texts)


def test_a_row_joins_stretches_from_unrelated_places():
    class Chars:
        def encode(self, text, add_special_tokens=False):
            return [ord(c) for c in text]

    one = text_rows(Chars(), 1, 400, seed=3, pieces=1)[0].tolist()
    two = text_rows(Chars(), 1, 400, seed=3, pieces=2)[0].tolist()
    assert one[:200] == two[:200] and one[200:] != two[200:]  # same first stretch, then elsewhere


@pytest.mark.parametrize("rows, n, pieces", [(0, 10, 1), (2, 0, 1), (-1, 5, 1), (2, 10, 0)])
def test_bad_sizes_are_refused(rows, n, pieces):
    with pytest.raises(ValueError, match="expected positive ints"):
        text_rows(TOK, rows, n, seed=0, pieces=pieces)


def test_a_tokenizer_that_gives_nothing_is_an_error_not_a_hang():
    class Empty:
        def encode(self, text, add_special_tokens=False):
            return []

    with pytest.raises(ValueError, match="tokenizer made 0 tokens"):
        text_rows(Empty(), 1, 10, seed=0)
