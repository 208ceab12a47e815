"""BABILong's answer check on hand-written outputs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

try:
    import gma6.data  # noqa: F401
except ImportError:  # not installed: use the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from gma6.data import TASK_LABELS, TASKS, answer_choices, score

Q1 = "Where is Mary?"
Q3 = "Where was the apple before the kitchen?"
Q4 = "What is north of the bathroom?"
Q5 = "Who gave the football to Jeff?"


@pytest.mark.parametrize(
    "output,target,question,task,expected",
    [
        # plain and decorated right answers
        ("bathroom", "bathroom", Q1, "qa1", True),
        ("Bathroom", "bathroom", Q1, "qa1", True),
        ("  The BATHROOM", "bathroom", Q1, "qa1", True),
        ("Mary is in the bathroom.", "bathroom", Q1, "qa1", True),
        ("The most recent location of Mary is bathroom.", "bathroom", Q1, "qa1", True),
        # only the first sentence counts
        ("bathroom. Before that she was in the garden.", "bathroom", Q1, "qa1", True),
        ("She moved around. She is in the bathroom.", "bathroom", Q1, "qa1", False),
        # a second label word makes the answer wrong
        ("bathroom or garden", "bathroom", Q1, "qa1", False),
        ("Mary went from the garden to the bathroom", "bathroom", Q1, "qa1", False),
        # wrong and empty answers
        ("garden", "bathroom", Q1, "qa1", False),
        ("I don't know", "bathroom", Q1, "qa1", False),
        ("", "bathroom", Q1, "qa1", False),
        # whole words only
        ("bathrooms", "bathroom", Q1, "qa1", False),
        ("the gardenhallway", "hallway", Q1, "qa1", False),
        # label words that are in the question are ignored
        ("The apple was in the office before the kitchen.", "office", Q3, "qa3", True),
        ("kitchen", "office", Q3, "qa3", False),
        ("The hallway is north of the bathroom", "hallway", Q4, "qa4", True),
        ("Fred gave the football to Jeff.", "Fred", Q5, "qa5", True),
        ("Bill gave it to Jeff", "Fred", Q5, "qa5", False),
        ("Fred and Bill", "Fred", Q5, "qa5", False),
        ("fred", "Fred", Q5, "qa5", True),
        # qa5 object answers
        ("He gave the milk.", "milk", "What did Fred give to Jeff?", "qa5", True),
        ("milk and apple", "milk", "What did Fred give to Jeff?", "qa5", False),
        # multi-word targets: every word needed, order free, nothing extra
        ("apple football", "apple football", "What did Fred give to Jeff?", "qa5", True),
        ("The football and the apple.", "apple football", "What did Fred give to Jeff?", "qa5", True),
        ("football", "apple football", "What did Fred give to Jeff?", "qa5", False),
        ("football, apple, milk", "apple football", "What did Fred give to Jeff?", "qa5", False),
        # words outside the task's labels are neither needed nor harmful
        ("the bathroom, I think", "bathroom", Q1, "qa1", True),
        ("Mary is in the bathroom with Jeff", "bathroom", Q1, "qa1", True),
        ("kitchen", "football", Q4, "qa5", False),
    ],
)
def test_score(output, target, question, task, expected):
    assert score(output, target, question, task) is expected


def test_target_outside_vocabulary_is_matched_as_is():
    assert score("The answer is yes", "yes", "Is it?", "qa1")
    assert not score("no", "yes", "Is it?", "qa1")


def test_labels_and_choices():
    assert TASK_LABELS["qa1"] == ("bathroom", "bedroom", "garden", "hallway", "kitchen", "office")
    assert set(TASK_LABELS["qa5"]) == {"fred", "jeff", "bill", "mary", "football", "apple", "milk"}
    assert set(TASK_LABELS) == set(TASKS)
    for task in TASKS:
        choices = answer_choices(task)
        assert [c.lower() for c in choices] == list(TASK_LABELS[task])
        for c in choices:
            assert score(c, c, "?", task)
    assert "Fred" in answer_choices("QA5")


def test_unknown_task():
    with pytest.raises(ValueError, match=r"qa7.*qa1"):
        score("x", "x", "?", "qa7")
    with pytest.raises(ValueError, match="qa0"):
        answer_choices("qa0")
