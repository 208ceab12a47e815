"""bAbI vocabulary shared by the BABILong-style tasks qa1-qa5.

World rules:
    * qa1-qa3 people: Mary, John, Daniel, Sandra. qa5 people: Fred, Jeff, Bill, Mary.
    * Places (qa1-qa4): bathroom, bedroom, garden, hallway, kitchen, office.
    * Objects (qa2, qa3, qa5): football, apple, milk.
    * Directions (qa4): north, south, east, west.

Answers are single label words: a place for qa1-qa4, a person or an object for qa5.
Scoring (see :mod:`gma6.data.scorer`) only looks for the label words of a task.
"""

from __future__ import annotations

PEOPLE: tuple[str, ...] = ("Mary", "John", "Daniel", "Sandra")
QA5_PEOPLE: tuple[str, ...] = ("Fred", "Jeff", "Bill", "Mary")
PLACES: tuple[str, ...] = ("bathroom", "bedroom", "garden", "hallway", "kitchen", "office")
OBJECTS: tuple[str, ...] = ("football", "apple", "milk")
DIRECTIONS: tuple[str, ...] = ("north", "south", "east", "west")
OPPOSITE: dict[str, str] = {"north": "south", "south": "north", "east": "west", "west": "east"}

MOVE_VERBS: tuple[str, ...] = ("moved", "went", "journeyed", "travelled")
PICK_VERBS: tuple[str, ...] = ("got", "grabbed", "picked up")
DROP_VERBS: tuple[str, ...] = ("dropped", "discarded", "put down")
GIVE_VERBS: tuple[str, ...] = ("gave", "handed", "passed")

TASKS: tuple[str, ...] = ("qa1", "qa2", "qa3", "qa4", "qa5")

TASK_DESCRIPTIONS: dict[str, str] = {
    "qa1": "single supporting fact",
    "qa2": "two supporting facts",
    "qa3": "three supporting facts",
    "qa4": "two argument relations",
    "qa5": "three argument relations",
}

_ANSWERS: dict[str, tuple[str, ...]] = {
    "qa1": PLACES,
    "qa2": PLACES,
    "qa3": PLACES,
    "qa4": PLACES,
    "qa5": QA5_PEOPLE + OBJECTS,
}

TASK_LABELS: dict[str, tuple[str, ...]] = {t: tuple(w.lower() for w in ws) for t, ws in _ANSWERS.items()}
"""Lower-case label vocabulary per task, as used by the scorer."""

# Distractor sentences containing any of these (or their plural) are dropped: a
# stray "kitchen" or "Mary" in filler text could otherwise contradict the facts.
BLOCKED_WORDS: frozenset[str] = frozenset(
    w.lower() for w in PEOPLE + QA5_PEOPLE + PLACES + OBJECTS + DIRECTIONS
)


def check_task(task: str) -> str:
    """Validates a task name.

    Args:
        task: A task name such as ``"qa1"`` (case-insensitive).

    Returns:
        The normalised (lower-case) task name.

    Raises:
        ValueError: If the task is not one of :data:`TASKS`.
    """
    name = str(task).strip().lower()
    if name not in TASKS:
        raise ValueError(f"unknown task {task!r}; valid tasks are {', '.join(TASKS)}")
    return name


def answer_choices(task: str) -> tuple[str, ...]:
    """Candidate answers of a task, spelled as targets are (names capitalised).

    Args:
        task: One of :data:`TASKS`.

    Returns:
        Every word that can be a target of ``task``, e.g. the six places for qa1.
    """
    return _ANSWERS[check_task(task)]
