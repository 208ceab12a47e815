"""BABILong-style generator: true answers (checked independently), lengths, seeds, splits."""

from __future__ import annotations

import random
import re
import sys
import time
from collections import deque
from pathlib import Path

import pytest

try:
    import gma6.data  # noqa: F401
except ImportError:  # not installed: use the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from gma6.data import (
    DEFAULT_TEMPLATE,
    TASKS,
    DistractorText,
    answer_choices,
    count_tokens,
    derive_seed,
    format_length,
    format_prompt,
    generate_sample,
    generate_samples,
    parse_length,
    prompt_parts,
    score,
    story_split,
)
from gma6.data.distractor import split_sentences


class WhitespaceTokenizer:
    """One token per whitespace-separated word."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [len(w) for w in text.split()]


class BosTokenizer(WhitespaceTokenizer):
    """Adds a start token to every call, so per-sentence counts overestimate a joined text."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [0] + super().encode(text)


# --------------------------------------------------------------------------- checker
# An independent re-reading of the facts: regexes and a fresh replay of the world.

MOVE = re.compile(r"^(\w+) (?:moved|went|journeyed|travelled) to the (\w+)\.$")
PICK = re.compile(r"^(\w+) (?:got|grabbed|picked up) the (\w+) there\.$")
DROP = re.compile(r"^(\w+) (?:dropped|discarded|put down) the (\w+)\.$")
GIVE = re.compile(r"^(\w+) (?:gave|handed|passed) the (\w+) to (\w+)\.$")
REL = re.compile(r"^The (\w+) is (north|south|east|west) of the (\w+)\.$")
PLACES = {"bathroom", "bedroom", "garden", "hallway", "kitchen", "office"}
OBJECTS = {"football", "apple", "milk"}
PEOPLE = {"qa1": {"Mary", "John", "Daniel", "Sandra"}, "qa5": {"Fred", "Jeff", "Bill", "Mary"}}
PEOPLE["qa2"] = PEOPLE["qa3"] = PEOPLE["qa1"]
STEP = {"north": (0, 1), "south": (0, -1), "east": (1, 0), "west": (-1, 0)}


def replay(task: str, facts: list[str]):
    """Replays people/object facts, asserting each is legal; returns the final world."""
    where: dict[str, str] = {}
    held: dict[str, str] = {}
    lies: dict[str, str] = {}
    seen_at: dict[str, list[str]] = {}
    gives: list[tuple[str, str, str]] = []
    for fact in facts:
        if m := MOVE.match(fact):
            who, dest = m.groups()
            assert who in PEOPLE[task] and dest in PLACES and where.get(who) != dest, fact
            where[who] = dest
            for obj, h in held.items():
                if h == who:
                    seen_at[obj].append(dest)
        elif (m := PICK.match(fact)) and task != "qa1":
            who, obj = m.groups()
            assert obj in OBJECTS and obj not in held and who in where, fact
            assert lies.get(obj, where[who]) == where[who], fact
            held[obj] = who
            lies.pop(obj, None)
            trail = seen_at.setdefault(obj, [])
            if not trail or trail[-1] != where[who]:
                trail.append(where[who])
        elif (m := DROP.match(fact)) and task != "qa1":
            who, obj = m.groups()
            assert held.get(obj) == who, fact
            del held[obj]
            lies[obj] = where[who]
        elif (m := GIVE.match(fact)) and task == "qa5":
            giver, obj, taker = m.groups()
            assert held.get(obj) == giver and giver != taker and where.get(taker) == where[giver], fact
            held[obj] = taker
            gives.append((giver, obj, taker))
        else:
            raise AssertionError(f"unexpected {task} fact: {fact!r}")
    return where, held, lies, seen_at, gives


def expected_answer(task: str, facts: list[str], question: str) -> str:
    if task == "qa4":
        return expected_qa4(facts, question)
    where, held, lies, seen_at, gives = replay(task, facts)
    if task == "qa1":
        (who,) = re.fullmatch(r"Where is (\w+)\?", question).groups()
        return where[who]
    if task == "qa2":
        (obj,) = re.fullmatch(r"Where is the (\w+)\?", question).groups()
        return where[held[obj]] if obj in held else lies[obj]
    if task == "qa3":
        obj, later = re.fullmatch(r"Where was the (\w+) before the (\w+)\?", question).groups()
        trail = seen_at[obj]
        assert trail.count(later) == 1, (trail, question)  # else the question is ambiguous
        k = trail.index(later)
        assert k > 0, (trail, question)
        return trail[k - 1]
    # qa5: the latest handover matching the question.
    patterns = [
        (r"Who gave the (?P<o>\w+)\?", "g"),
        (r"Who received the (?P<o>\w+)\?", "r"),
        (r"What did (?P<g>\w+) give to (?P<r>\w+)\?", "o"),
        (r"Who did (?P<g>\w+) give the (?P<o>\w+) to\?", "r"),
        (r"Who gave the (?P<o>\w+) to (?P<r>\w+)\?", "g"),
    ]
    for pattern, wanted in patterns:
        if m := re.fullmatch(pattern, question):
            key = m.groupdict()
            matches = [
                dict(g=g, o=o, r=r) for g, o, r in gives if all(dict(g=g, o=o, r=r)[k] == v for k, v in key.items())
            ]
            assert matches, question
            return matches[-1][wanted]
    raise AssertionError(f"unexpected qa5 question {question!r}")


def expected_qa4(facts: list[str], question: str) -> str:
    rel: set[tuple[str, str, str]] = set()  # (a, d, b): a is d of b
    opposite = {"north": "south", "south": "north", "east": "west", "west": "east"}
    for fact in facts:
        m = REL.match(fact)
        assert m, fact
        a, d, b = m.groups()
        assert a != b and a in PLACES and b in PLACES
        rel |= {(a, d, b), (b, opposite[d], a)}
    # The relations must fit on a grid: place everything by BFS and check each fact.
    xy: dict[str, tuple[int, int]] = {}
    for start in sorted({a for a, _, _ in rel}):
        if start in xy:
            continue
        xy[start] = (0, 0) if not xy else (1000 * len(xy), 0)
        todo = deque([start])
        while todo:
            b = todo.popleft()
            for a, d, bb in rel:
                if bb == b:
                    pos = (xy[b][0] + STEP[d][0], xy[b][1] + STEP[d][1])
                    if a in xy:
                        assert xy[a] == pos, facts
                    else:
                        xy[a] = pos
                        todo.append(a)
    assert len(set(xy.values())) == len(xy), facts
    if m := re.fullmatch(r"What is (\w+) of the (\w+)\?", question):
        d, b = m.groups()
        answers = {a for a, dd, bb in rel if dd == d and bb == b}
        origin, step = xy[b], STEP[d]
    else:
        a, d = re.fullmatch(r"What is the (\w+) (\w+) of\?", question).groups()
        answers = {bb for aa, dd, bb in rel if aa == a and dd == d}
        origin, step = xy[a], STEP[opposite[d]]
    assert len(answers) == 1, (facts, question)
    (answer,) = answers
    # Nothing else may lie further along the asked direction ("north of" = right above).
    for place, (x, y) in xy.items():
        dx, dy = x - origin[0], y - origin[1]
        along = (dx * step[0] + dy * step[1]) > 0 and (dx * step[1] - dy * step[0]) == 0
        if along and abs(dx) + abs(dy) < 1000:
            assert place == answer, (facts, question)
    return answer


# --------------------------------------------------------------------------- answers


@pytest.mark.parametrize("task", TASKS)
def test_answers_true_by_construction(task):
    forms = set()
    for seed in range(300):
        s = generate_sample(task, 0, seed)
        assert s.task == task and s.length == 0 and s.seed == seed
        assert s.target == expected_answer(task, s.facts, s.question), (s.facts, s.question)
        assert s.target in answer_choices(task)
        assert s.supporting and list(s.supporting) == sorted(set(s.supporting))
        assert all(0 <= i < len(s.facts) for i in s.supporting)
        # The answer word never appears in the question (BABILong's scorer drops those).
        assert s.target.lower() not in s.question.lower().rstrip("?").split()
        assert score(s.target, s.target, s.question, task)
        forms.add(re.sub(r"\b[A-Z][a-z]+\b|\b(" + "|".join(PLACES | OBJECTS | set(STEP)) + r")\b", "_", s.question))
    # Each task's question types all show up.
    assert len(forms) == {"qa1": 1, "qa2": 1, "qa3": 1, "qa4": 2, "qa5": 5}[task], forms


@pytest.mark.parametrize("task", TASKS)
def test_other_questions_are_answered_right_and_change_nothing_else(task):
    asked = 0
    for seed in range(200):
        s = generate_sample(task, 0, seed)
        questions = [q for q, _ in s.other_questions]
        assert s.question not in questions and len(set(questions)) == len(questions)
        for q, t in s.other_questions:
            assert t == expected_answer(task, s.facts, q), (s.facts, q)
        asked += len(questions)
    assert asked > 100  # most stories answer more than one question
    # Only questions of the sample's own split: a test item is never a train sample's extra question.
    for split in ("train", "test"):
        for s in generate_samples(task, 0, 100, split, num_facts={"qa1": 1, "qa2": 2, "qa3": 3, "qa4": 1, "qa5": 4}[task]):
            assert all(story_split(task, s.facts, q, t) == split for q, t in s.other_questions)


@pytest.mark.parametrize(
    "task,num_facts", [("qa1", 1), ("qa2", 2), ("qa3", 3), ("qa4", 1), ("qa4", 7), ("qa5", 4), ("qa5", 40)]
)
def test_answers_at_extreme_story_sizes(task, num_facts):
    for seed in range(200):
        s = generate_sample(task, 0, seed, num_facts=num_facts)
        assert len(s.facts) == num_facts
        assert s.target == expected_answer(task, s.facts, s.question)


def test_supporting_facts_carry_the_answer():
    for seed in range(100):
        s = generate_sample("qa1", 0, seed)
        (i,) = s.supporting
        who = s.question.split()[-1].rstrip("?")
        assert s.facts[i].startswith(who + " ") and s.facts[i].endswith(f" {s.target}.")
        s = generate_sample("qa4", 0, seed)
        assert s.target in s.facts[s.supporting[0]]
        s = generate_sample("qa5", 0, seed)
        assert s.target in s.facts[s.supporting[0]]


def test_num_facts_range_is_respected():
    sizes = {len(generate_sample("qa2", 0, seed, num_facts=(5, 7)).facts) for seed in range(100)}
    assert sizes == {5, 6, 7}


# --------------------------------------------------------------------------- context and length


def facts_in_order(context: str, facts: list[str]) -> bool:
    pos = 0
    for fact in facts:
        found = context.find(fact, pos)
        if found < 0:
            return False
        pos = found + len(fact)
    return True


@pytest.mark.parametrize("task", TASKS)
def test_facts_hidden_in_order(task):
    tok = WhitespaceTokenizer()
    for seed in range(20):
        s = generate_sample(task, "2k", seed, tokenizer=tok)
        assert facts_in_order(s.context, s.facts)
        # Facts sit at sentence boundaries, not inside a distractor sentence.
        for fact in s.facts:
            at = s.context.index(fact)
            assert at == 0 or (s.context[at - 1] == " " and s.context[at - 2] in ".!?\"')]"), fact
            end = at + len(fact)
            assert end == len(s.context) or s.context[end] == " "
    s0 = generate_sample(task, 0, 3)
    assert s0.context == " ".join(s0.facts)


@pytest.mark.parametrize("length", ["1k", "4k", "16k"])
@pytest.mark.parametrize("task", TASKS)
def test_length_within_five_percent(task, length):
    tok = WhitespaceTokenizer()
    n = parse_length(length)
    for seed in range(5):
        s = generate_sample(task, length, seed, tokenizer=tok)
        measured = len(tok.encode(s.context))
        assert abs(measured - n) <= 0.05 * n, (measured, n)
        assert s.n_tokens == measured and s.length == n
        proxy = generate_sample(task, length, seed)
        assert abs(count_tokens(proxy.context) - n) <= 0.05 * n


def test_length_shorter_than_the_facts_keeps_all_facts():
    s = generate_sample("qa3", 10, 0, num_facts=12)
    assert s.context == " ".join(s.facts) and s.length == 10


def test_length_corrected_when_sentence_counts_do_not_add_up():
    tok = BosTokenizer()  # +1 per call: summed sentence counts overshoot by ~4%
    for length in (1024, 8192):
        s = generate_sample("qa2", length, 7, tokenizer=tok)
        measured = len(tok.encode(s.context))
        assert abs(measured - length) <= 0.02 * length + 1, measured


class CountingTokenizer(WhitespaceTokenizer):
    """Records how many characters it was asked to encode."""

    def __init__(self) -> None:
        self.chars = 0

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self.chars += len(text)
        return super().encode(text)


def test_sentence_token_counts_are_cached():
    tok = CountingTokenizer()
    s = generate_sample("qa2", "16k", 5, tokenizer=tok)
    # Each sentence once, plus one check of the whole context.
    assert tok.chars <= 2.2 * len(s.context)
    tok.chars = 0
    again = generate_sample("qa2", "16k", 5, tokenizer=tok)
    assert again == s and tok.chars <= 1.1 * len(s.context)


def test_128k_sample_is_fast_and_long():
    tok = WhitespaceTokenizer()
    DistractorText.default()  # the corpus is built once per process; time the sample
    t0 = time.perf_counter()
    s = generate_sample("qa3", "128k", 11, tokenizer=tok)
    elapsed = time.perf_counter() - t0
    measured = len(tok.encode(s.context))
    assert abs(measured - 131072) <= 0.05 * 131072
    assert facts_in_order(s.context, s.facts)
    assert elapsed < 10, elapsed
    # The default corpus is large enough that 128k tokens do not repeat sentences.
    body = [x for x in split_sentences(s.context) if x not in s.facts]
    assert len(set(body)) > 0.98 * len(body)


def test_default_distractor_is_clean_and_large():
    d = DistractorText.default()
    banned = re.compile(
        r"\b(mary|john|daniel|sandra|fred|jeff|bill|bathroom|bedroom|garden|hallway|kitchen|office|"
        r"football|apple|milk|north|south|east|west)s?\b",
        re.IGNORECASE,
    )
    assert not [x for x in d.sentences if banned.search(x)]
    assert len(set(d.sentences)) == len(d.sentences)
    assert d.total_tokens() > 140_000  # proxy tokens: room for a 128k context
    assert d is DistractorText.default()


def test_custom_distractor_file_and_wraparound(tmp_path):
    text = (
        "The river ran cold beneath the bridge. Mary waited in the kitchen for news.\n"
        "Nobody spoke of the storm that night.\n\nA lamp burned low in the window! Was it late?"
    )
    path = tmp_path / "book.txt"
    path.write_text(text)
    d = DistractorText.from_file(path)
    assert d.sentences == (
        "The river ran cold beneath the bridge.",
        "Nobody spoke of the storm that night.",
        "A lamp burned low in the window!",
        "Was it late?",
    )
    tok = WhitespaceTokenizer()
    s = generate_sample("qa1", 1000, 4, tokenizer=tok, distractor=d)  # far longer than the book
    assert abs(len(tok.encode(s.context)) - 1000) <= 50
    assert facts_in_order(s.context, s.facts)
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        DistractorText.from_file(tmp_path / "nope.txt")
    with pytest.raises(ValueError):
        DistractorText.from_text("Mary went to the kitchen.")


def test_different_seeds_start_at_different_offsets():
    starts = {generate_sample("qa1", "1k", seed).context[:80] for seed in range(20)}
    assert len(starts) >= 18


# --------------------------------------------------------------------------- seeds and splits


def test_same_seed_same_sample_and_no_global_random():
    state = random.getstate()
    tok = WhitespaceTokenizer()
    for task in TASKS:
        a = generate_sample(task, "4k", 123, tokenizer=tok)
        b = generate_sample(task, "4k", 123, tokenizer=tok)
        assert a == b
        assert generate_sample(task, "4k", 124, tokenizer=tok) != a
    assert random.getstate() == state
    assert generate_samples("qa2", 0, 5, "test", seed=3) == generate_samples("qa2", 0, 5, "test", seed=3)
    assert generate_samples("qa2", 0, 5, "test", seed=3) != generate_samples("qa2", 0, 5, "test", seed=4)


def test_story_is_the_same_at_every_length():
    short = generate_samples("qa3", 0, 10, "test")
    long = generate_samples("qa3", "2k", 10, "test")
    for a, b in zip(short, long):
        assert (a.facts, a.question, a.target, a.seed) == (b.facts, b.question, b.target, b.seed)
        assert len(b.context) > len(a.context)


@pytest.mark.parametrize("task", TASKS)
def test_train_and_test_never_share_a_story(task):
    # The smallest stories make chance collisions certain without the content split.
    tiny = {"qa1": 1, "qa2": 2, "qa3": 3, "qa4": 1, "qa5": 4}[task]
    sets = {}
    for split in ("train", "test"):
        samples = generate_samples(task, 0, 300, split, num_facts=tiny)
        assert all(story_split(task, s.facts, s.question, s.target) == split for s in samples)
        sets[split] = {(tuple(s.facts), s.question, s.target) for s in samples}
    assert sets["train"] and sets["test"] and not (sets["train"] & sets["test"])
    train_seeds = {derive_seed("train", task, i) for i in range(1000)}
    test_seeds = {derive_seed("test", task, i) for i in range(1000)}
    assert len(train_seeds) == len(test_seeds) == 1000 and not (train_seeds & test_seeds)


# --------------------------------------------------------------------------- prompts


def test_prompt_layout_and_parts():
    s = generate_sample("qa1", "1k", 5)
    prompt = format_prompt(s)
    assert prompt.startswith("I will give you context with the facts about positions of different persons")
    assert f"<context>\n{s.context}\n</context>" in prompt
    assert prompt.endswith(f"Question: {s.question}\nAnswer:")
    parts = prompt_parts(s)
    assert parts.prefix + parts.context + parts.suffix == prompt == parts.text
    assert parts.prefix.endswith("<context>\n") and parts.suffix.startswith("\n</context>")
    assert parts.context == s.context and parts.question == s.question
    assert parts.instruction in parts.prefix
    custom = format_prompt(s, template="{context}\nQ: {question}\nA:", instruction="x")
    assert custom == f"{s.context}\nQ: {s.question}\nA:"
    with pytest.raises(ValueError, match="context"):
        format_prompt(s, template="{instruction} {question}")
    for task in TASKS:
        assert DEFAULT_TEMPLATE and format_prompt(generate_sample(task, 0, 1)).count("<context>") == 1


# --------------------------------------------------------------------------- bad input


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"qa9.*qa1, qa2, qa3, qa4, qa5"):
        generate_sample("qa9", 0, 0)
    with pytest.raises(ValueError, match="qa6"):
        generate_samples("qa6", 0, 1)
    with pytest.raises(ValueError, match="length"):
        generate_sample("qa1", -1, 0)
    with pytest.raises(ValueError, match="length"):
        generate_sample("qa1", "-2k", 0)
    with pytest.raises(ValueError, match="length"):
        generate_sample("qa1", "four k", 0)
    with pytest.raises(ValueError, match="split"):
        generate_samples("qa1", 0, 1, split="validation")
    with pytest.raises(ValueError, match="n must"):
        generate_samples("qa1", 0, -1)
    with pytest.raises(ValueError, match="facts"):
        generate_sample("qa5", 0, 0, num_facts=2)
    with pytest.raises(ValueError, match="facts"):
        generate_sample("qa4", 0, 0, num_facts=8)
    with pytest.raises(ValueError, match="seed"):
        generate_sample("qa1", 0, "1")  # type: ignore[arg-type]


def test_parse_and_format_length():
    assert parse_length(0) == 0 and parse_length("0k") == 0
    assert parse_length("4k") == 4096 and parse_length("128K") == 131072
    assert parse_length("1M") == 1024**2 and parse_length(" 3000 ") == 3000 and parse_length("1.5k") == 1536
    assert [format_length(n) for n in (0, 1024, 4096, 131072, 1024**2, 3000)] == [
        "0k", "1k", "4k", "128k", "1M", "3000"
    ]
    assert generate_sample("qa1", "1k", 0).length == 1024
