"""BABILong prompt layout: instruction, ``<context>...</context>``, question, ``Answer:``.

A memory model reads the context segment by segment and only then sees the question,
so :func:`prompt_parts` splits the formatted prompt into the text before the context,
the context itself and the text after it; the three concatenate to :func:`format_prompt`.
"""

from __future__ import annotations

from dataclasses import dataclass

from .generator import Sample
from .vocab import check_task

INSTRUCTIONS: dict[str, str] = {
    "qa1": (
        "I will give you context with the facts about positions of different persons hidden in some "
        "random text and a question. You need to answer the question based only on the information "
        "from the facts. If a person was in different locations, use the latest location to answer "
        "the question. Answer with a single word: the location."
    ),
    "qa2": (
        "I will give you context with the facts about where different persons went and which objects "
        "they picked up or put down, hidden in some random text, and a question. You need to answer "
        "the question based only on the information from the facts. An object that a person carries "
        "moves with that person; an object that was put down stays where it was put down. Use the "
        "latest facts. Answer with a single word: the location."
    ),
    "qa3": (
        "I will give you context with the facts about where different persons went and which objects "
        "they picked up or put down, hidden in some random text, and a question. You need to answer "
        "the question based only on the information from the facts. An object that a person carries "
        "moves with that person; an object that was put down stays where it was put down. The question "
        "asks where an object was just before it arrived at the named location. Answer with a single "
        "word: the location."
    ),
    "qa4": (
        "I will give you context with the facts about how different locations are placed relative to "
        "each other, hidden in some random text, and a question. You need to answer the question based "
        "only on the information from the facts. If a location is north of another one, the second is "
        "south of the first; east and west work the same way. Answer with a single word: the location."
    ),
    "qa5": (
        "I will give you context with the facts about persons moving around and passing objects to "
        "each other, hidden in some random text, and a question. You need to answer the question based "
        "only on the information from the facts. If the same kind of handover happened several times, "
        "use the latest one. Answer with a single word: a person's name or an object."
    ),
}
"""Per-task instructions (the qa1 wording follows BABILong's)."""

DEFAULT_TEMPLATE = "{instruction}\n\n<context>\n{context}\n</context>\n\nQuestion: {question}\nAnswer:"
"""Format string with the fields ``instruction``, ``context`` and ``question``."""

_CONTEXT_MARK = "\x00GMA6_CONTEXT\x00"


@dataclass(frozen=True)
class PromptParts:
    """A prompt cut around its context: ``prefix + context + suffix`` is the prompt.

    Attributes:
        instruction: The task instruction alone.
        prefix: Everything before the context (instruction, ``<context>`` tag).
        context: The context text (facts in distractor text).
        suffix: Everything after the context (closing tag, question, ``Answer:``).
        question: The question alone.
    """

    instruction: str
    prefix: str
    context: str
    suffix: str
    question: str

    @property
    def text(self) -> str:
        """The whole prompt."""
        return self.prefix + self.context + self.suffix


def _check_template(template: str) -> None:
    for name in ("{context}", "{question}"):
        if name not in template:
            raise ValueError(f"prompt template must contain {name}: {template!r}")


def prompt_parts(sample: Sample, template: str = DEFAULT_TEMPLATE, instruction: str | None = None) -> PromptParts:
    """Splits a sample's prompt into the text before, at and after the context.

    Args:
        sample: A generated or loaded sample.
        template: A ``str.format`` template with ``{context}`` and ``{question}`` (each
            once) and optionally ``{instruction}``; literal braces must be doubled.
        instruction: Overrides the task's entry in :data:`INSTRUCTIONS`.

    Returns:
        The pieces of the prompt.

    Raises:
        ValueError: If the template lacks a field or the task is unknown.
    """
    _check_template(template)
    instr = INSTRUCTIONS[check_task(sample.task)] if instruction is None else instruction
    marked = template.format(instruction=instr, context=_CONTEXT_MARK, question=sample.question)
    if marked.count(_CONTEXT_MARK) != 1:
        raise ValueError("prompt template must contain {context} exactly once")
    prefix, suffix = marked.split(_CONTEXT_MARK)
    return PromptParts(instr, prefix, sample.context, suffix, sample.question)


def format_prompt(sample: Sample, template: str = DEFAULT_TEMPLATE, instruction: str | None = None) -> str:
    """The full BABILong-style prompt of a sample (see :func:`prompt_parts`)."""
    return prompt_parts(sample, template, instruction).text
