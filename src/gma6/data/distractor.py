"""Distractor ("haystack") text that the facts of a story are hidden in.

The default text ships with Python itself: the prose of the language reference kept in
``pydoc_data.topics`` followed by the docstrings found in the standard library's source
files (read as text in sorted path order, never imported, so it is deterministic for a
given Python version). Code samples, doctests, lists and code-like sentences are dropped
and every sentence is kept once; that gives roughly 150k words (about 200k tokens), so
even a 128k-token context does not repeat itself.

Any sentence that mentions a bAbI vocabulary word (a person, place, object or compass
direction, see :data:`gma6.data.vocab.BLOCKED_WORDS`) is removed, because filler text
saying "the kitchen" could contradict a fact. :meth:`DistractorText.from_file` accepts
any text file (e.g. a PG19 book) and applies the same filter.

Token counting: with a tokenizer, a sentence costs ``len(tokenizer.encode(sentence,
add_special_tokens=False))`` tokens; without one, the proxy is whitespace words times
:data:`WORDS_TO_TOKENS` (1.3, close to BPE tokenizers on English prose). Counts are
cached per sentence and tokenizer, so a long context costs one pass over the sentences
it uses rather than repeated tokenisation of the whole text.
"""

from __future__ import annotations

import inspect
import os
import random
import re
import sysconfig
import weakref
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

from .vocab import BLOCKED_WORDS

WORDS_TO_TOKENS = 1.3
"""Tokens per whitespace word assumed when no tokenizer is given."""


class Tokenizer(Protocol):
    """Anything with a Hugging Face style ``encode``."""

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


def count_tokens(text: str, tokenizer: Tokenizer | None = None) -> float:
    """Counts the tokens of ``text``.

    Args:
        text: Any text.
        tokenizer: An object with ``encode(text, add_special_tokens=False)``; ``None``
            uses the whitespace proxy (words x :data:`WORDS_TO_TOKENS`).

    Returns:
        The token count (a float for the proxy, an integral value otherwise).
    """
    if tokenizer is None:
        return len(text.split()) * WORDS_TO_TOKENS
    try:
        return float(len(tokenizer.encode(text, add_special_tokens=False)))
    except TypeError:  # e.g. tiktoken-like encoders without the keyword
        return float(len(tokenizer.encode(text)))


# --------------------------------------------------------------------------- sentences

_BLOCKED_RE = re.compile(r"\b(?:" + "|".join(sorted(BLOCKED_WORDS)) + r")s?\b", re.IGNORECASE)
_ABBREVIATIONS = frozenset("mr mrs ms dr st jr sr vs etc e.g i.e cf no fig vol ch p pp mt".split())
_END_RE = re.compile(r"[.!?]+[\"')\]]*\s+(?=[\"'(\[]*[A-Z0-9])")


def mentions_task_vocabulary(sentence: str) -> bool:
    """Whether ``sentence`` names a bAbI person, place, object or direction."""
    return _BLOCKED_RE.search(sentence) is not None


def split_sentences(text: str) -> list[str]:
    """Splits prose into sentences.

    Paragraphs are separated by blank lines; line breaks inside a paragraph are joined.
    A sentence ends at ``.``, ``!`` or ``?`` (plus closing quotes or brackets) followed by
    whitespace and a capital letter or digit, except after common abbreviations.

    Args:
        text: Plain text.

    Returns:
        Whitespace-normalised sentences in text order.
    """
    out: list[str] = []
    for para in re.split(r"\n\s*\n", text):
        para = " ".join(para.split())
        start = 0
        for m in _END_RE.finditer(para):
            words = para[start : m.start() + 1].split()
            last = words[-1].rstrip(".!?\"')]").lower().lstrip("\"'([") if words else ""
            if para[m.start()] == "." and (last in _ABBREVIATIONS or len(last) == 1):
                continue
            out.append(para[start : m.end()].strip())
            start = m.end()
        if para[start:].strip():
            out.append(para[start:].strip())
    return out


# Sentences of the default corpus must look like plain English: a capitalised start, a
# sentence end, and none of the characters that mark code ({}, =, <, >, backticks ...).
_PROSE_RE = re.compile(r"^[A-Z][A-Za-z0-9 ,;:'\"()\-./_%*\[\]]*[a-z0-9)'\"][.!?]$")


def _is_prose(sentence: str, min_words: int = 6, max_words: int = 60) -> bool:
    n = len(sentence.split())
    return min_words <= n <= max_words and _PROSE_RE.match(sentence) is not None


def _prose_paragraphs(doc: str) -> Iterable[str]:
    """Paragraphs of a docstring that are running text (no code, lists or headings)."""
    for para in re.split(r"\n\s*\n", doc):
        lines = para.split("\n")
        if any(
            line.startswith((" ", "\t", ">>>", "*", "-", "=", "..", "+", "|", "#"))
            or line.rstrip().endswith("::")
            for line in lines
        ):
            continue
        yield para


def _dedupe_filter(sentences: Iterable[str], prose_only: bool, filter_vocab: bool) -> list[str]:
    seen: set[str] = set()
    out = []
    for s in sentences:
        if not s or s in seen or not re.search(r"[A-Za-z]", s):
            continue
        if prose_only and not _is_prose(s):
            continue
        if filter_vocab and mentions_task_vocabulary(s):
            continue
        seen.add(s)
        out.append(s)
    return out


STDLIB_SKIP_DIRS = frozenset(
    {"test", "tests", "site-packages", "dist-packages", "idlelib", "__pycache__", "lib2to3",
     "turtledemo", "ensurepip", "pydoc_data", "venv"}
)
_TRIPLE_QUOTED = re.compile(r'"""(.*?)"""|\'\'\'(.*?)\'\'\'', re.DOTALL)


def stdlib_py_files(skip_dirs: frozenset[str]) -> Iterable[Path]:
    """The running Python's standard-library ``.py`` files in sorted path order, folders named in
    ``skip_dirs`` left out (none when the interpreter ships no sources)."""
    root = sysconfig.get_paths().get("stdlib")
    if not (root and os.path.isdir(root)):
        return
    for base, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in skip_dirs)
        yield from (Path(base, name) for name in sorted(files) if name.endswith(".py"))


def _stdlib_texts() -> Iterable[str]:
    """Prose that ships with the running Python, in a fixed order."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip it
        topics = {}
    for key in sorted(topics):
        yield topics[key]
    for path in stdlib_py_files(STDLIB_SKIP_DIRS):
        try:
            source = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        for m in _TRIPLE_QUOTED.finditer(source):
            yield inspect.cleandoc(m.group(1) or m.group(2) or "")
    # Docstrings of built-in objects, for interpreters without source files.
    import builtins

    for name in sorted(dir(builtins)):
        yield inspect.getdoc(getattr(builtins, name)) or ""


def _default_sentences() -> list[str]:
    def sentences() -> Iterable[str]:
        for text in _stdlib_texts():
            for para in _prose_paragraphs(text):
                yield from split_sentences(para)

    return _dedupe_filter(sentences(), prose_only=True, filter_vocab=True)


# --------------------------------------------------------------------------- corpus


class _StrongRef:
    """Stand-in for ``weakref.ref`` on objects that cannot be weakly referenced."""

    def __init__(self, obj: Any) -> None:
        self._obj = obj

    def __call__(self) -> Any:
        return self._obj


class DistractorText:
    """A pool of filler sentences, with cached per-sentence token counts.

    Args:
        sentences: Sentences in reading order.
        name: Label for messages and ``repr``.
        filter_vocab: Drop sentences that mention bAbI vocabulary (recommended).

    Raises:
        ValueError: If no sentence is left.
    """

    def __init__(self, sentences: Sequence[str], name: str = "custom", filter_vocab: bool = True) -> None:
        self.name = name
        self.sentences: tuple[str, ...] = tuple(_dedupe_filter(sentences, prose_only=False, filter_vocab=filter_vocab))
        if not self.sentences:
            raise ValueError(f"distractor text {name!r} has no usable sentences")
        # id(tokenizer) -> (reference to it, counts). The reference proves the id still
        # names the same tokenizer; a weak one lets the tokenizer be freed.
        self._counts: dict[int, tuple[Callable[[], Any], list[float | None]]] = {}

    def __len__(self) -> int:
        return len(self.sentences)

    def __repr__(self) -> str:
        return f"DistractorText({self.name!r}, {len(self)} sentences)"

    @classmethod
    def from_text(cls, text: str, name: str = "text", filter_vocab: bool = True) -> DistractorText:
        """Builds a corpus from raw prose (split with :func:`split_sentences`)."""
        return cls(split_sentences(text), name=name, filter_vocab=filter_vocab)

    @classmethod
    def from_file(
        cls, path: str | os.PathLike[str], encoding: str = "utf-8", filter_vocab: bool = True
    ) -> DistractorText:
        """Builds a corpus from a plain-text file, e.g. a PG19 book.

        Raises:
            FileNotFoundError: If ``path`` does not exist.
        """
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"distractor text file not found: {p}")
        return cls.from_text(p.read_text(encoding=encoding, errors="replace"), name=str(p), filter_vocab=filter_vocab)

    @classmethod
    def default(cls) -> DistractorText:
        """The shared corpus harvested from Python's own documentation (built once)."""
        global _DEFAULT
        if _DEFAULT is None:
            _DEFAULT = cls(_default_sentences(), name="python-stdlib-docs", filter_vocab=False)
        return _DEFAULT

    def token_count(self, index: int, tokenizer: Tokenizer | None = None) -> float:
        """Token count of sentence ``index`` (computed once per tokenizer)."""
        key = id(tokenizer)
        entry = self._counts.get(key)
        if entry is None or entry[0]() is not tokenizer:
            for k in [k for k, (r, _) in self._counts.items() if isinstance(r, weakref.ref) and r() is None]:
                del self._counts[k]
            try:
                ref: Callable[[], Any] = weakref.ref(tokenizer)  # type: ignore[arg-type]
            except TypeError:  # None, or objects without weakref support
                ref = _StrongRef(tokenizer)
            entry = (ref, [None] * len(self.sentences))
            self._counts[key] = entry
        counts = entry[1]
        c = counts[index]
        if c is None:
            c = counts[index] = count_tokens(self.sentences[index], tokenizer)
        return c

    def total_tokens(self, tokenizer: Tokenizer | None = None) -> float:
        """Token count of the whole corpus (tokenises every sentence once)."""
        return sum(self.token_count(i, tokenizer) for i in range(len(self)))

    def take(self, n_tokens: float, rng: random.Random, tokenizer: Tokenizer | None = None) -> list[str]:
        """Consecutive sentences from a random offset, totalling about ``n_tokens``.

        Near the end, a sentence that would overshoot more than stopping short is
        skipped in favour of a shorter one, so the total is usually within a few tokens.
        The corpus wraps around (and so repeats) only if it is shorter than requested.

        Args:
            n_tokens: Token budget; ``<= 0`` returns no sentences.
            rng: Chooses the start offset.
            tokenizer: See :func:`count_tokens`.

        Returns:
            The chosen sentences in reading order.
        """
        return self.take_counted(n_tokens, rng, tokenizer)[0]

    def take_counted(
        self, n_tokens: float, rng: random.Random, tokenizer: Tokenizer | None = None
    ) -> tuple[list[str], float]:
        """Like :meth:`take`, also returning the summed token count of the sentences."""
        if n_tokens <= 0:
            return [], 0.0
        n = len(self.sentences)
        i = rng.randrange(n)
        out: list[str] = []
        total = 0.0
        skips = 0
        while total < n_tokens and skips < 64:
            c = self.token_count(i % n, tokenizer)
            if total + c <= n_tokens or total + c - n_tokens <= n_tokens - total:
                out.append(self.sentences[i % n])
                total += c
            else:
                skips += 1
            i += 1
        return out, total


_DEFAULT: DistractorText | None = None
