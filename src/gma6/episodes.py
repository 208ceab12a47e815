"""Samples as token tensors: context segments for the memory, then a question with its answer.

A memory model reads ``context`` segment by segment (each segment starts with BOS: every segment
is a fresh window for the base), then sees the question segment ``BOS + question + answer``.
The question segment is left-padded so every answer ends at the last position; positions count
real tokens only, so padding changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from .data.generator import Sample
from .data.prompts import prompt_parts


@dataclass
class Episode:
    """One sample's token ids (no BOS; it is added per segment)."""

    context: list[int]
    question: list[int]
    answer: list[int]


@dataclass
class Batch:
    """Padded tensors of several episodes.

    Attributes:
        context: (B, N) context ids, right-padded; ``context_mask`` marks real tokens.
        question: (B', Q) ``BOS + question + answer``, left-padded; ``question_mask`` marks real tokens.
        answer_mask: (B', Q) True where the token is part of the answer (what the loss is on).
        question_source: (B',) the context row each question asks about; None: question i asks
            about context i (B' = B). Several questions can share one read of a context.
    """

    context: torch.Tensor
    context_mask: torch.Tensor
    question: torch.Tensor
    question_mask: torch.Tensor
    answer_mask: torch.Tensor
    question_source: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> Batch:
        return Batch(*(t.to(device) if t is not None else None for t in (
            self.context, self.context_mask, self.question, self.question_mask, self.answer_mask, self.question_source)))


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens."""
    return list(tokenizer.encode(text, add_special_tokens=False))


def encode_episode(sample: Sample, tokenizer: Any) -> Episode:
    """Tokenise a sample: instruction + context as the document, the rest as the question."""
    parts = prompt_parts(sample)
    return Episode(
        context=encode(tokenizer, parts.prefix + parts.context),
        question=encode(tokenizer, parts.suffix),
        # The full stop teaches a trained memory to end its answer (BABILong's scorer cuts there).
        answer=encode(tokenizer, " " + sample.target + "."),
    )


def encode_question(sample: Sample, tokenizer: Any, question: str, target: str) -> Episode:
    """Another question (and answer) about ``sample``'s context; the context itself is not encoded."""
    other = replace(sample, question=question, target=target)
    return Episode(context=[], question=encode(tokenizer, prompt_parts(other).suffix),
                   answer=encode(tokenizer, " " + target + "."))


def collate_questions(contexts: list[Episode], questions: list[Episode], source: list[int],
                      bos_token_id: int | None, pad_token_id: int = 0) -> Batch:
    """Pad contexts and questions separately; question ``i`` asks about context ``source[i]``."""
    if len(questions) != len(source) or not contexts or any(not 0 <= j < len(contexts) for j in source):
        raise ValueError("collate_questions: every question needs the index of one of the contexts")
    ctx = collate(contexts, bos_token_id, pad_token_id)
    qs = collate([Episode(context=[], question=q.question, answer=q.answer) for q in questions], bos_token_id, pad_token_id)
    return Batch(ctx.context, ctx.context_mask, qs.question, qs.question_mask, qs.answer_mask,
                 torch.tensor(source, dtype=torch.long))


def collate(episodes: list[Episode], bos_token_id: int | None, pad_token_id: int = 0, with_answer: bool = True) -> Batch:
    """Pad episodes into a ``Batch`` (the answer is left out of ``question`` when ``with_answer`` is False)."""
    if not episodes:
        raise ValueError("collate needs at least one episode")
    bos = [bos_token_id] if bos_token_id is not None else []
    n = max(max(len(e.context) for e in episodes), 1)
    qs = [bos + e.question + (e.answer if with_answer else []) for e in episodes]
    q = max(len(x) for x in qs)
    b = len(episodes)
    context = torch.full((b, n), pad_token_id, dtype=torch.long)
    context_mask = torch.zeros(b, n, dtype=torch.bool)
    question = torch.full((b, q), pad_token_id, dtype=torch.long)
    question_mask = torch.zeros(b, q, dtype=torch.bool)
    answer_mask = torch.zeros(b, q, dtype=torch.bool)
    for i, (e, x) in enumerate(zip(episodes, qs)):
        context[i, : len(e.context)] = torch.tensor(e.context, dtype=torch.long)
        context_mask[i, : len(e.context)] = True
        question[i, q - len(x) :] = torch.tensor(x, dtype=torch.long)
        question_mask[i, q - len(x) :] = True
        if with_answer:
            answer_mask[i, q - len(e.answer) :] = True
    return Batch(context, context_mask, question, question_mask, answer_mask)
