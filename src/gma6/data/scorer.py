"""BABILong's answer check.

The model output is lower-cased and cut at its first ``.``. From what is left, the task's
label words (:data:`gma6.data.vocab.TASK_LABELS`) that appear as whole words are kept,
except those that also appear in the question (a model echoing "before the kitchen" is
not answering "kitchen"). The answer is right only if the kept words are exactly the
target's label words: a correct word next to another label word is wrong.
"""

from __future__ import annotations

import re

from .vocab import TASK_LABELS, check_task

_WORD_RE = re.compile(r"[a-z]+")


def _words(text: str) -> set[str]:
    return set(_WORD_RE.findall(text.lower()))


def score(output: str, target: str, question: str, task: str) -> bool:
    """Whether ``output`` answers ``question`` with ``target`` under BABILong's rules.

    Args:
        output: The model's generated text.
        target: The reference answer; may hold several label words (e.g. ``"apple
            football"``), which must then all be present, in any order.
        question: The question that was asked.
        task: ``"qa1"`` ... ``"qa5"``.

    Returns:
        ``True`` if the label words in the first sentence of ``output`` that are not in
        ``question`` are exactly the target's.

    Raises:
        ValueError: For an unknown task.
    """
    labels = set(TASK_LABELS[check_task(task)])
    target_words = _words(target)
    # A target outside the task vocabulary (e.g. from other data) is matched as is.
    wanted = (target_words & labels) or target_words
    vocab = labels | wanted
    first = output.lower().split(".", 1)[0]
    found = (_words(first) & vocab) - _words(question)
    return bool(wanted) and found == wanted
