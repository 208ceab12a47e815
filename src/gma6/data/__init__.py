"""Offline BABILong-style long-context benchmark (bAbI tasks qa1-qa5).

Modules, one concept each:
    * :mod:`~gma6.data.vocab`: bAbI vocabulary, task names and answer labels.
    * :mod:`~gma6.data.worlds`: world simulators that write stories with true answers.
    * :mod:`~gma6.data.distractor`: filler text and token counting.
    * :mod:`~gma6.data.generator`: :class:`Sample`, lengths, seeds and splits.
    * :mod:`~gma6.data.prompts`: BABILong's prompt layout, cut around the context.
    * :mod:`~gma6.data.scorer`: BABILong's answer check.
    * :mod:`~gma6.data.loader`: the official release from a local folder (or the hub).
"""

from .distractor import DistractorText, count_tokens
from .generator import (
    SPLITS,
    Sample,
    derive_seed,
    format_length,
    generate_sample,
    generate_samples,
    parse_length,
    story_split,
)
from .loader import load_official
from .prompts import DEFAULT_TEMPLATE, INSTRUCTIONS, PromptParts, format_prompt, prompt_parts
from .scorer import score
from .vocab import TASK_LABELS, TASKS, answer_choices
from .worlds import DEFAULT_NUM_FACTS, Story, make_story

__all__ = [
    "DEFAULT_NUM_FACTS",
    "DEFAULT_TEMPLATE",
    "INSTRUCTIONS",
    "SPLITS",
    "TASKS",
    "TASK_LABELS",
    "DistractorText",
    "PromptParts",
    "Sample",
    "Story",
    "answer_choices",
    "count_tokens",
    "derive_seed",
    "format_length",
    "format_prompt",
    "generate_sample",
    "generate_samples",
    "load_official",
    "make_story",
    "parse_length",
    "prompt_parts",
    "score",
    "story_split",
]
