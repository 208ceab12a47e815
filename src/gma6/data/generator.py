"""BABILong-style samples: a bAbI story hidden, in order, inside distractor text.

Seeds and splits:
    * :func:`generate_sample` is a pure function of its arguments: the story comes from
      ``random.Random`` seeded by a hash of ``(task, seed)`` and the filler from one of
      ``(task, seed, length)``; the global ``random`` state is never touched.
    * The story does not depend on ``length``, so one seed gives the same question at
      every context length (as in BABILong, which reuses its bAbI samples per length).
    * :func:`generate_samples` derives per-sample seeds by hashing
      ``(split, task, index, base seed)``. Train and test are also separated by content:
      every story is assigned to a split by a hash of its facts, question and answer, and
      the generator redraws until the story belongs to the requested split, so a train
      story can never equal a test story, even in tiny worlds where draws collide.

Lengths are context lengths in tokens (facts plus filler). ``0`` means facts only.
For ``length > 0`` the context lands within a few tokens of the target whenever the
facts alone are shorter than it; otherwise the context is just the facts (longer than
``length``), since no fact is ever dropped.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass, field

from .distractor import DistractorText, Tokenizer, count_tokens
from .vocab import check_task
from .worlds import Story, make_story

SPLITS: tuple[str, ...] = ("train", "test")

_UNITS = {"": 1, "k": 1024, "m": 1024**2}


@dataclass
class Sample:
    """One benchmark item.

    Attributes:
        task: ``"qa1"`` ... ``"qa5"``.
        facts: The story's fact sentences, in order (empty for loaded official data).
        question: The question.
        target: The reference answer.
        context: The facts inserted into distractor text (the text the model reads).
        length: Target context length in tokens (0: facts only).
        seed: Seed that reproduces the sample with :func:`generate_sample` (``None`` for
            loaded data).
        supporting: Indices into ``facts`` of the facts that the answer needs.
        n_tokens: Context length as counted when it was built (tokenizer or proxy).
        split: ``"train"``/``"test"`` if the story was drawn for a split.
        other_questions: Further ``(question, target)`` pairs the same facts answer, of the same
            split (generated samples only; used to ask several questions per context in training).
    """

    task: str
    facts: list[str]
    question: str
    target: str
    context: str
    length: int
    seed: int | None
    supporting: tuple[int, ...] = ()
    n_tokens: int | None = None
    split: str | None = field(default=None, compare=False)
    other_questions: tuple[tuple[str, str], ...] = field(default=(), compare=False, repr=False)


def parse_length(value: int | str) -> int:
    """Parses a context length.

    Args:
        value: A non-negative int, or a string such as ``"4k"`` (4096), ``"128K"``,
            ``"1M"`` (1024**2), ``"1.5k"`` or ``"3000"``.

    Returns:
        The length in tokens.

    Raises:
        ValueError: If the value is negative or not a length.
    """
    if isinstance(value, bool):
        raise ValueError(f"invalid length {value!r}")
    if isinstance(value, int):
        n = value
    else:
        m = re.fullmatch(r"\s*(-?\d+(?:\.\d+)?)\s*([kKmM]?)\s*", str(value))
        if m is None:
            raise ValueError(f"invalid length {value!r}; use an int or a string like '4k'")
        n = int(round(float(m.group(1)) * _UNITS[m.group(2).lower()]))
    if n < 0:
        raise ValueError(f"length must be >= 0, got {value!r}")
    return n


def format_length(n: int) -> str:
    """Name of a length as in the BABILong release (``4096 -> "4k"``, ``0 -> "0k"``)."""
    n = parse_length(n)
    if n == 0:
        return "0k"
    if n % 1024**2 == 0:
        return f"{n // 1024**2}M"
    if n % 1024 == 0:
        return f"{n // 1024}k"
    return str(n)


def _hash_int(*parts: object) -> int:
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def derive_seed(split: str, task: str, index: int, base_seed: int = 0) -> int:
    """Seed of sample ``index`` of ``split`` (a 63-bit hash of all four inputs)."""
    return _hash_int("gma6.babilong.sample", _check_split(split), check_task(task), index, base_seed)


def story_split(task: str, facts: list[str] | tuple[str, ...], question: str, target: str) -> str:
    """The split a story belongs to, decided by a hash of its content."""
    h = _hash_int("gma6.babilong.split", check_task(task), "\n".join(facts), question, target)
    return SPLITS[h & 1]


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits are {', '.join(SPLITS)}")
    return split


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    return seed


def _draw_story(task: str, seed: int, num_facts: int | tuple[int, int] | None, split: str | None) -> Story:
    rng = random.Random(_hash_int("story", task, seed))
    for _ in range(10_000):
        story = make_story(task, rng, num_facts)
        if split is None or story_split(task, story.facts, story.question, story.target) == split:
            return story
    raise RuntimeError(f"no {split} story found for {task} with num_facts={num_facts!r}")


def _interleave(facts: tuple[str, ...], filler: list[str], rng: random.Random) -> str:
    """Puts each fact at a random sentence boundary of ``filler``, keeping fact order."""
    slots = sorted(rng.randint(0, len(filler)) for _ in facts)
    parts: list[str] = []
    j = 0
    for pos, sentence in enumerate(filler + [""]):
        while j < len(facts) and slots[j] == pos:
            parts.append(facts[j])
            j += 1
        if sentence:
            parts.append(sentence)
    return " ".join(parts)


def generate_sample(
    task: str,
    length: int | str,
    seed: int,
    tokenizer: Tokenizer | None = None,
    distractor: DistractorText | None = None,
    *,
    num_facts: int | tuple[int, int] | None = None,
    split: str | None = None,
) -> Sample:
    """Generates one sample.

    Args:
        task: ``"qa1"`` ... ``"qa5"``.
        length: Target context length in tokens (int or e.g. ``"4k"``); 0 = facts only.
        seed: Any int; the same arguments always give the same sample.
        tokenizer: Counts tokens (``encode(text, add_special_tokens=False)``); ``None``
            uses the whitespace proxy of :func:`gma6.data.distractor.count_tokens`.
        distractor: Filler text; defaults to :meth:`DistractorText.default`.
        num_facts: Facts per story: an int, an inclusive ``(low, high)`` range, or
            ``None`` for the task default (see :data:`gma6.data.worlds.DEFAULT_NUM_FACTS`).
        split: If ``"train"``/``"test"``, only stories of that split are drawn.

    Returns:
        The sample.

    Raises:
        ValueError: For an unknown task or split, a negative or malformed length, a
            non-int seed or an unsupported ``num_facts``.
    """
    task = check_task(task)
    n = parse_length(length)
    seed = _check_seed(seed)
    if split is not None:
        _check_split(split)
    story = _draw_story(task, seed, num_facts, split)
    facts = story.facts
    if n == 0:
        context = " ".join(facts)
        n_tokens = count_tokens(context, tokenizer)
    else:
        pool = distractor if distractor is not None else DistractorText.default()
        fact_tokens = sum(count_tokens(f, tokenizer) for f in facts)

        def build(budget: float) -> tuple[str, float]:
            rng = random.Random(_hash_int("distractor", task, seed, n))
            filler, filler_tokens = pool.take_counted(budget, rng, tokenizer)
            return _interleave(facts, filler, rng), fact_tokens + filler_tokens

        budget = n - fact_tokens
        context, n_tokens = build(budget)
        if tokenizer is not None:
            # Summed sentence counts can be off (merges at joins, per-call extra
            # tokens): measure the whole context once and, if needed, rebuild once
            # with the budget rescaled by the observed ratio.
            measured = count_tokens(context, tokenizer)
            if budget > 0 and n_tokens > 0 and abs(measured - n) > 0.02 * n:
                context, _ = build(n * n_tokens / measured - fact_tokens)
                measured = count_tokens(context, tokenizer)
            n_tokens = measured
    return Sample(
        task=task,
        facts=list(facts),
        question=story.question,
        target=story.target,
        context=context,
        length=n,
        seed=seed,
        supporting=story.supporting,
        n_tokens=int(round(n_tokens)),
        split=split,
        # Only questions of the sample's own split: (facts, question, answer) decides the split,
        # so another question on the same facts may be a test item.
        other_questions=tuple((q, t) for q, t, _ in story.alternatives
                              if split is None or story_split(task, facts, q, t) == split),
    )


def generate_samples(
    task: str,
    length: int | str,
    n: int,
    split: str = "train",
    seed: int = 0,
    tokenizer: Tokenizer | None = None,
    distractor: DistractorText | None = None,
    *,
    num_facts: int | tuple[int, int] | None = None,
) -> list[Sample]:
    """Generates ``n`` samples of one task, split and length.

    Sample ``i`` uses seed ``derive_seed(split, task, i, seed)`` and is drawn from
    ``split``'s half of the story space (see the module docstring), so the train and
    test sets never share a story, and index ``i`` is the same sample at every length.

    Args:
        task: ``"qa1"`` ... ``"qa5"``.
        length: Target context length (int or e.g. ``"4k"``).
        n: Number of samples (>= 0).
        split: ``"train"`` or ``"test"``.
        seed: Base seed; different bases give independent sets.
        tokenizer: See :func:`generate_sample`.
        distractor: See :func:`generate_sample`.
        num_facts: See :func:`generate_sample`.

    Returns:
        The samples, in index order.

    Raises:
        ValueError: For bad arguments (see :func:`generate_sample`) or ``n < 0``.
    """
    task = check_task(task)
    split = _check_split(split)
    length = parse_length(length)
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    _check_seed(seed)
    return [
        generate_sample(
            task, length, derive_seed(split, task, i, seed), tokenizer, distractor, num_facts=num_facts, split=split
        )
        for i in range(n)
    ]
