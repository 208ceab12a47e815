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
    context_facts: list[bool] | None = None  # per context token: part of a fact sentence (when asked)


@dataclass
class Batch:
    """Padded tensors of several episodes.

    Attributes:
        context: (B, N) context ids, right-padded; ``context_mask`` marks real tokens.
        question: (B', Q) ``BOS + question + answer``, left-padded; ``question_mask`` marks real tokens.
        answer_mask: (B', Q) True where the token is part of the answer (what the loss is on).
        question_source: (B',) the context row each question asks about; None: question i asks
            about context i (B' = B). Several questions can share one read of a context.
        context_facts: (B, N) True at context tokens of the story's fact sentences (when the
            episodes carry them): what a memory should keep, as a training target for the write.
    """

    context: torch.Tensor
    context_mask: torch.Tensor
    question: torch.Tensor
    question_mask: torch.Tensor
    answer_mask: torch.Tensor
    question_source: torch.Tensor | None = None
    context_facts: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> Batch:
        return Batch(*(t.to(device) if t is not None else None for t in (
            self.context, self.context_mask, self.question, self.question_mask, self.answer_mask, self.question_source,
            self.context_facts)))


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens."""
    return list(tokenizer.encode(text, add_special_tokens=False))


def fact_mask(tokenizer: Any, text: str, ids: list[int], facts: list[str], start: int = 0) -> list[bool]:
    """For each token of ``text`` (``ids``, its encoding), whether it overlaps one of ``facts``,
    which occur in ``text[start:]`` in this order (as the generator interleaves them).

    Raises:
        TypeError: the tokenizer gives no character offsets (``return_offsets_mapping``: a fast one).
        ValueError: a fact is missing from the text, or the offsets disagree with ``ids``.
    """
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = list(enc["offset_mapping"])
    except (TypeError, KeyError, NotImplementedError) as e:
        raise TypeError(f"fact masks need a tokenizer that returns character offsets "
                        f"(return_offsets_mapping, a fast tokenizer); {type(tokenizer).__name__} does not ({e})") from e
    if list(enc["input_ids"]) != list(ids):
        raise ValueError("fact masks: the tokenizer's offsets belong to another encoding of the text")
    spans, pos = [], start
    for fact in facts:
        at = text.find(fact, pos)
        if at < 0:
            raise ValueError(f"fact masks: the fact {fact!r} is not in the context (after character {pos})")
        spans.append((at, at + len(fact)))
        pos = at + len(fact)
    return [any(a < e and s < b for s, e in spans) for a, b in offsets]


def encode_episode(sample: Sample, tokenizer: Any, facts: bool = False) -> Episode:
    """Tokenise a sample: instruction + context as the document, the rest as the question.
    With ``facts``, also mark the context tokens of its fact sentences (``fact_mask``)."""
    parts = prompt_parts(sample)
    context = encode(tokenizer, parts.prefix + parts.context)
    return Episode(
        context=context,
        question=encode(tokenizer, parts.suffix),
        # The full stop teaches a trained memory to end its answer (BABILong's scorer cuts there).
        answer=encode(tokenizer, " " + sample.target + "."),
        context_facts=fact_mask(tokenizer, parts.prefix + parts.context, context, sample.facts, len(parts.prefix))
        if facts else None,
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
                 torch.tensor(source, dtype=torch.long), ctx.context_facts)


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
    with_facts = all(e.context_facts is not None for e in episodes)
    context_facts = torch.zeros(b, n, dtype=torch.bool) if with_facts else None
    for i, (e, x) in enumerate(zip(episodes, qs)):
        context[i, : len(e.context)] = torch.tensor(e.context, dtype=torch.long)
        context_mask[i, : len(e.context)] = True
        if context_facts is not None and e.context:
            context_facts[i, : len(e.context)] = torch.tensor(e.context_facts, dtype=torch.bool)
        question[i, q - len(x) :] = torch.tensor(x, dtype=torch.long)
        question_mask[i, q - len(x) :] = True
        if with_answer:
            answer_mask[i, q - len(e.answer) :] = True
    return Batch(context, context_mask, question, question_mask, answer_mask, context_facts=context_facts)
