"""World simulators that write bAbI stories (qa1-qa5) whose answers are true by construction.

World rules (the simulator keeps the true state and only emits legal events):
    * A move always takes a person to a place other than where they are.
    * A person can pick an object up only once their place is known; the object must
      be free (not held) and, if it was dropped somewhere, lie in that place.
      "got/grabbed/picked up the X there" puts X in the person's hands.
    * A held object travels with its holder; a dropped one stays where it was dropped.
    * qa5 "gave/handed/passed": the giver holds the object and the receiver is in the
      same place; the object changes hands.
    * qa4 places sit on a grid; "A is north of B" means A is the cell right above B.
      Questions only ask about pairs stated in a fact (either direction), and never
      when another place lies further along the asked direction, so "north of"
      can't be read as "somewhere north of".

Questions and their meaning:
    * qa1 "Where is P?": P's latest place.
    * qa2 "Where is the X?": X's current place (its holder's place, or where dropped).
    * qa3 "Where was the X before the Y?": the place X was in just before it reached Y;
      only asked when X reached Y exactly once.
    * qa4 "What is D of the Y?" / "What is the Y D of?".
    * qa5 "Who gave the X?", "Who received the X?", "What did A give to B?",
      "Who did A give the X to?", "Who gave the X to B?": the latest matching handover.
"""

from __future__ import annotations

import operator
import random
from dataclasses import dataclass, field

from .vocab import (
    DIRECTIONS,
    DROP_VERBS,
    GIVE_VERBS,
    MOVE_VERBS,
    OBJECTS,
    OPPOSITE,
    PEOPLE,
    PICK_VERBS,
    PLACES,
    QA5_PEOPLE,
    check_task,
)

DEFAULT_NUM_FACTS: dict[str, tuple[int, int]] = {
    "qa1": (2, 10),
    "qa2": (4, 16),
    "qa3": (6, 20),
    "qa4": (2, 5),
    "qa5": (4, 20),
}
"""Default inclusive range of the number of facts per story."""

MIN_FACTS: dict[str, int] = {"qa1": 1, "qa2": 2, "qa3": 3, "qa4": 1, "qa5": 4}
MAX_FACTS: dict[str, int] = {"qa1": 200, "qa2": 200, "qa3": 200, "qa4": 7, "qa5": 200}
"""qa4 is capped by the grid: six places have at most seven adjacent pairs."""

_MAX_TRIES = 5000

_DIR_STEP: dict[str, tuple[int, int]] = {"north": (0, 1), "south": (0, -1), "east": (1, 0), "west": (-1, 0)}


@dataclass(frozen=True)
class Story:
    """A bAbI story: the facts, one question about them and its answer.

    Attributes:
        facts: Fact sentences in story order.
        question: The question, e.g. ``"Where is Mary?"``.
        target: The answer word.
        supporting: Sorted indices into ``facts`` of the facts the answer needs.
        alternatives: The other questions the same facts answer, as ``(question, target,
            supporting)`` (drawn without touching the random stream: a story is the same with or
            without them). Training can ask several questions per context read.
    """

    facts: tuple[str, ...]
    question: str
    target: str
    supporting: tuple[int, ...]
    alternatives: tuple[tuple[str, str, tuple[int, ...]], ...] = ()


def _others(options: list[tuple[str, str, tuple[int, ...]]], chosen: str) -> tuple[tuple[str, str, tuple[int, ...]], ...]:
    """Every option but the chosen question, each question once, in order."""
    seen = {chosen}
    out = []
    for q, t, sup in options:
        if q not in seen:
            seen.add(q)
            out.append((q, t, sup))
    return tuple(out)


def resolve_num_facts(task: str, num_facts: int | tuple[int, int] | None, rng: random.Random) -> int:
    """Picks the number of facts for one story.

    Args:
        task: A task name.
        num_facts: An exact count, an inclusive ``(low, high)`` range, or ``None`` for
            :data:`DEFAULT_NUM_FACTS`.
        rng: Random source used when a range is given.

    Returns:
        The number of facts.

    Raises:
        ValueError: If the count or range is outside what the task supports.
    """
    task = check_task(task)
    lo_ok, hi_ok = MIN_FACTS[task], MAX_FACTS[task]
    if num_facts is None:
        num_facts = DEFAULT_NUM_FACTS[task]
    try:
        if isinstance(num_facts, bool):
            raise TypeError
        lo = hi = operator.index(num_facts)  # type: ignore[arg-type]
    except TypeError:
        try:
            lo, hi = (int(v) for v in num_facts)  # type: ignore[union-attr]
        except (TypeError, ValueError):
            raise ValueError(f"num_facts must be an int or a (low, high) pair, got {num_facts!r}") from None
    if lo > hi:
        raise ValueError(f"num_facts range {num_facts!r} is empty")
    if lo < lo_ok or hi > hi_ok:
        raise ValueError(f"{task} supports between {lo_ok} and {hi_ok} facts per story, got {num_facts!r}")
    return rng.randint(lo, hi)


def make_story(task: str, rng: random.Random, num_facts: int | tuple[int, int] | None = None) -> Story:
    """Simulates one story of ``task``.

    Args:
        task: One of ``qa1`` ... ``qa5``.
        rng: The only source of randomness (the same state gives the same story).
        num_facts: See :func:`resolve_num_facts`.

    Returns:
        A story whose answer follows from its facts.

    Raises:
        ValueError: For an unknown task or an unsupported number of facts.
        RuntimeError: If no valid story was found (not expected for supported sizes).
    """
    task = check_task(task)
    n = resolve_num_facts(task, num_facts, rng)
    build = _BUILDERS[task]
    for _ in range(_MAX_TRIES):
        story = build(rng, n)
        if story is not None:
            return story
    raise RuntimeError(f"could not build a {task} story with {n} facts")


# --------------------------------------------------------------------------- actors


@dataclass
class _Actors:
    """True state of people and objects, with the fact index behind each piece of it."""

    people: tuple[str, ...]
    place: dict[str, str] = field(default_factory=dict)
    moved_at: dict[str, int] = field(default_factory=dict)
    holder: dict[str, str] = field(default_factory=dict)
    lying: dict[str, str] = field(default_factory=dict)
    # qa3: per object, (place, supporting fact indices) each time it reached a new place.
    trail: dict[str, list[tuple[str, tuple[int, ...]]]] = field(default_factory=dict)
    taken_at: dict[str, int] = field(default_factory=dict)
    dropped_at: dict[str, tuple[int, int]] = field(default_factory=dict)
    gives: list[tuple[str, str, str, int]] = field(default_factory=list)
    facts: list[str] = field(default_factory=list)

    def object_place(self, obj: str) -> str | None:
        if obj in self.holder:
            return self.place[self.holder[obj]]
        return self.lying.get(obj)

    def options(self, kinds: tuple[str, ...]) -> dict[str, list[tuple]]:
        opts: dict[str, list[tuple]] = {k: [] for k in kinds}
        if "move" in opts:
            opts["move"] = [(p,) for p in self.people]
        if "pick" in opts:
            for p in self.people:
                here = self.place.get(p)
                if here is None:
                    continue
                for o in OBJECTS:
                    if o not in self.holder and self.lying.get(o, here) == here:
                        opts["pick"].append((p, o))
        if "drop" in opts:
            opts["drop"] = [(p, o) for o, p in sorted(self.holder.items())]
        if "give" in opts:
            for o, p in sorted(self.holder.items()):
                for q in self.people:
                    if q != p and self.place.get(q) == self.place[p]:
                        opts["give"].append((p, o, q))
        return {k: v for k, v in opts.items() if v}

    def move(self, rng: random.Random, person: str) -> None:
        i = len(self.facts)
        dest = rng.choice([x for x in PLACES if x != self.place.get(person)])
        self.facts.append(f"{person} {rng.choice(MOVE_VERBS)} to the {dest}.")
        self.place[person] = dest
        self.moved_at[person] = i
        for obj, who in self.holder.items():
            if who == person:
                self.trail[obj].append((dest, (self.taken_at[obj], i)))

    def pick(self, rng: random.Random, person: str, obj: str) -> None:
        i = len(self.facts)
        self.facts.append(f"{person} {rng.choice(PICK_VERBS)} the {obj} there.")
        self.holder[obj] = person
        self.lying.pop(obj, None)
        self.taken_at[obj] = i
        trail = self.trail.setdefault(obj, [])
        if not trail:
            trail.append((self.place[person], (self.moved_at[person], i)))

    def drop(self, rng: random.Random, person: str, obj: str) -> None:
        i = len(self.facts)
        self.facts.append(f"{person} {rng.choice(DROP_VERBS)} the {obj}.")
        del self.holder[obj]
        self.lying[obj] = self.place[person]
        self.dropped_at[obj] = (i, self.moved_at[person])

    def give(self, rng: random.Random, giver: str, obj: str, receiver: str) -> None:
        i = len(self.facts)
        self.facts.append(f"{giver} {rng.choice(GIVE_VERBS)} the {obj} to {receiver}.")
        self.holder[obj] = receiver
        self.taken_at[obj] = i
        self.gives.append((giver, obj, receiver, i))


def _simulate(rng: random.Random, n: int, people: tuple[str, ...], weights: dict[str, float]) -> _Actors:
    """Runs ``n`` random legal events, choosing the event kind by ``weights``."""
    w = _Actors(people=people)
    kinds = tuple(weights)
    for _ in range(n):
        opts = w.options(kinds)
        names = sorted(opts)
        kind = rng.choices(names, weights=[weights[k] for k in names])[0]
        getattr(w, kind)(rng, *rng.choice(opts[kind]))
    return w


def _sorted(idx: tuple[int, ...] | list[int]) -> tuple[int, ...]:
    return tuple(sorted(set(idx)))


# --------------------------------------------------------------------------- tasks


def _qa1(rng: random.Random, n: int) -> Story | None:
    w = _simulate(rng, n, PEOPLE, {"move": 1.0})
    person = rng.choice(sorted(w.place))
    options = [(f"Where is {p}?", w.place[p], (w.moved_at[p],)) for p in sorted(w.place)]
    return Story(tuple(w.facts), f"Where is {person}?", w.place[person], (w.moved_at[person],),
                 _others(options, f"Where is {person}?"))


def _qa2(rng: random.Random, n: int) -> Story | None:
    w = _simulate(rng, n, PEOPLE, {"move": 0.5, "pick": 0.3, "drop": 0.2})
    known = [o for o in OBJECTS if w.object_place(o) is not None]
    if not known:
        return None
    obj = rng.choice(known)

    def option(o: str) -> tuple[str, str, tuple[int, ...]]:
        support = (w.taken_at[o], w.moved_at[w.holder[o]]) if o in w.holder else w.dropped_at[o]
        place = w.object_place(o)
        assert place is not None
        return f"Where is the {o}?", place, _sorted(support)

    question, place, support = option(obj)
    return Story(tuple(w.facts), question, place, support, _others([option(o) for o in known], question))


def _qa3(rng: random.Random, n: int) -> Story | None:
    w = _simulate(rng, n, PEOPLE, {"move": 0.55, "pick": 0.3, "drop": 0.15})
    candidates = []
    for obj, trail in sorted(w.trail.items()):
        places = [p for p, _ in trail]
        for k in range(1, len(trail)):
            if places.count(places[k]) == 1:
                candidates.append((obj, k))
    if not candidates:
        return None
    # Favour the object's latest move, as bAbI does, but also ask about earlier ones.
    obj, k = candidates[-1] if rng.random() < 0.5 else rng.choice(candidates)

    def option(o: str, j: int) -> tuple[str, str, tuple[int, ...]]:
        trail = w.trail[o]
        return f"Where was the {o} before the {trail[j][0]}?", trail[j - 1][0], _sorted(trail[j - 1][1] + trail[j][1])

    question, target, support = option(obj, k)
    return Story(tuple(w.facts), question, target, support, _others([option(o, j) for o, j in candidates], question))


def _qa5(rng: random.Random, n: int) -> Story | None:
    w = _simulate(rng, n, QA5_PEOPLE, {"move": 0.35, "pick": 0.2, "drop": 0.1, "give": 0.35})
    if not w.gives:
        return None
    forms = []
    for j, (giver, obj, receiver, i) in enumerate(w.gives):
        later = w.gives[j + 1 :]
        # A question is about event j only if no later handover matches its key.
        if not any(o == obj for _, o, _, _ in later):
            forms.append((f"Who gave the {obj}?", giver, i))
            forms.append((f"Who received the {obj}?", receiver, i))
        if not any(g == giver and r == receiver for g, _, r, _ in later):
            forms.append((f"What did {giver} give to {receiver}?", obj, i))
        if not any(g == giver and o == obj for g, o, _, _ in later):
            forms.append((f"Who did {giver} give the {obj} to?", receiver, i))
        if not any(o == obj and r == receiver for _, o, r, _ in later):
            forms.append((f"Who gave the {obj} to {receiver}?", giver, i))
    question, target, i = rng.choice(forms)
    return Story(tuple(w.facts), question, target, (i,), _others([(q, t, (j,)) for q, t, j in forms], question))


def _qa4(rng: random.Random, n: int) -> Story | None:
    k = min(len(PLACES), n + 1 + rng.randint(0, 2))
    names = rng.sample(PLACES, k)
    cells: dict[tuple[int, int], str] = {(0, 0): names[0]}
    for name in names[1:]:
        free = sorted(
            {(x + dx, y + dy) for (x, y) in cells for dx, dy in _DIR_STEP.values()} - set(cells)
        )
        # Prefer cells touching several placed rooms: denser grids allow more facts.
        touch = [sum((x + dx, y + dy) in cells for dx, dy in _DIR_STEP.values()) for x, y in free]
        cells[rng.choices(free, weights=[t * t for t in touch])[0]] = name
    where = {name: xy for xy, name in cells.items()}
    pairs = []  # (a, direction, b): a is `direction` of b
    for (x, y), b in sorted(cells.items()):
        for d in ("north", "east"):
            dx, dy = _DIR_STEP[d]
            a = cells.get((x + dx, y + dy))
            if a is not None:
                pairs.append((a, d, b))
    if len(pairs) < n:
        return None
    chosen = rng.sample(pairs, n)
    facts = []
    for a, d, b in chosen:
        if rng.random() < 0.5:
            a, d, b = b, OPPOSITE[d], a
        facts.append((a, d, b))

    def clear_ray(start: str, d: str, answer: str) -> bool:
        x, y = where[start]
        dx, dy = _DIR_STEP[d]
        others = [
            v for v, (vx, vy) in where.items()
            if v != answer and ((dx and vy == y and (vx - x) * dx > 0) or (dy and vx == x and (vy - y) * dy > 0))
        ]
        return not others

    options = []
    for i, (a, d, b) in enumerate(facts):
        for qa, qd, qb in ((a, d, b), (b, OPPOSITE[d], a)):  # qa is qd of qb
            if clear_ray(qb, qd, qa):
                options.append((f"What is {qd} of the {qb}?", qa, i))
            if clear_ray(qa, OPPOSITE[qd], qb):
                options.append((f"What is the {qa} {qd} of?", qb, i))
    if not options:
        return None
    question, target, i = rng.choice(options)
    sentences = tuple(f"The {a} is {d} of the {b}." for a, d, b in facts)
    return Story(sentences, question, target, (i,), _others([(q, t, (j,)) for q, t, j in options], question))


_BUILDERS = {"qa1": _qa1, "qa2": _qa2, "qa3": _qa3, "qa4": _qa4, "qa5": _qa5}
