"""Memory-only training on generated BABILong-style samples, with a curriculum over segments.

One loop, top to bottom: build the batch for the global step (data is a pure function of the
step, so a resumed run sees exactly the batches it would have seen), read the context segments
with the memory carried, score the answer tokens of the question segment, step AdamW. Nothing
here names a device: it follows the model's.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from .data.generator import derive_seed, generate_sample
from .data.structured import text_rows
from .data.vocab import TASKS, check_task
from .distributed import Replicas
from .episodes import Batch, collate, collate_questions, encode_episode, encode_question
from .io import atomic_write, atomic_write_text
from .model import split_aligned, split_segments

CHECKPOINT_DIR = "checkpoint"
TRAINER_STATE = "trainer_state.pt"


# consecutive non-finite gradients after which training stops instead of skipping another update
MAX_SKIPPED_IN_A_ROW = 10


@dataclass
class TrainConfig:
    """What ``train`` does. Validated on construction.

    Attributes:
        tasks: BABILong tasks mixed in every batch, round robin: a task named k times takes k
            shares of each batch (``["qa1", "qa2", "qa2"]``: a third qa1, two thirds qa2).
        segment_length: tokens per segment, BOS included.
        curriculum: context segments per stage; each stage starts from the last one's weights.
        steps_per_stage: optimizer steps per stage.
        batch_size: samples per step.
        lr, weight_decay, warmup_steps, min_lr_ratio: AdamW with linear warmup, cosine decay to
            ``lr * min_lr_ratio`` over the whole run.
        persistent_lr: the learning rate of the persistent slots and their logit bias
            (``GMA6Config.persistent_slots``) on the same schedule; None: ``lr``. Learned vectors of
            unit scale moved from a near-zero logit want a larger step than the adapters beside them.
        grad_clip: max gradient norm (0 disables).
        bptt_segments: backpropagate through at most this many context segments (None: all).
        num_facts: facts per story (None: the task's default).
        seed: base seed of the training data stream and of torch.
        log_every, checkpoint_every: in steps (checkpoint_every 0: only at the end).
        lora_rank: co-train LoRA adapters of this rank on the base (0: memory only; needs peft).
        lm_weight: weight of the next-token loss on the context (at ``lm_positions`` random
            positions a segment), which keeps the memory from hurting the base on ordinary text.
        questions_per_context: ask up to this many questions about each context read (the
            sample's own plus others its facts answer, same split): more answer tokens a step for
            one read of the context.
        kl_weight: weight of KL(bare base || memory model) over the next token at the same positions:
            zero for an untrained memory, so it asks only that the memory change nothing it need not
            (an extra forward of the bare base per context segment, without gradients).
        distill_weight: weight of matching, at the question's tokens, the hidden states after each
            memory layer to those the bare base makes with the whole context in its window (a dense
            target for what the memory should deliver; an extra no-grad pass of the base a batch).
        select_weight: weight of supervising the tokens write's choice (``write_rule="tokens"``):
            binary cross-entropy of each context token's write score against whether it belongs to
            one of the story's fact sentences (known for generated samples). Teaches *what* to keep
            directly, where the answer loss reaches the choice only through the kept tokens' gates.
        text_kl_weight: weight of the same KL on ``text_kl_rows`` rows of structured text (the
            standard library's source: code, markup, URLs; ``gma6.data.structured``) read for
            ``text_kl_segments`` segments from a fresh memory, at ``lm_positions`` random positions a
            segment. The stories' filler is plain prose; this keeps the memory from disturbing the
            base on the other kinds of text it will read.
        question_reads: the memory writes the question (BOS + question, never the answer) this many times
            after the context and before the question is answered (a second read hop; ``gma6 eval
            --question-reads`` asks the same way).
        in_context: a ceiling, not a memory: the base reads ``BOS + context + question`` in one
            window with the memory switched off and only its LoRA trained (needs ``lora_rank``).
            What the base can learn of the tasks when it sees every fact at once.
    """

    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    segment_length: int = 256
    curriculum: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    steps_per_stage: int = 200
    batch_size: int = 16
    lr: float = 1e-3
    persistent_lr: float | None = None
    weight_decay: float = 0.0
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    bptt_segments: int | None = None
    num_facts: int | None = None
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 100
    lora_rank: int = 0
    lm_weight: float = 0.0
    lm_positions: int = 16
    kl_weight: float = 0.0
    questions_per_context: int = 1
    in_context: bool = False
    distill_weight: float = 0.0
    select_weight: float = 0.0
    text_kl_weight: float = 0.0
    text_kl_rows: int = 8
    text_kl_segments: int = 4
    question_reads: int = 0

    def __post_init__(self) -> None:
        self.tasks = [check_task(t) for t in self.tasks]
        if not self.tasks:
            raise ValueError("tasks is empty: name at least one of " + ", ".join(TASKS))
        for name in ("segment_length", "steps_per_stage", "batch_size", "log_every", "questions_per_context",
                     "text_kl_rows", "text_kl_segments"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name}={v!r}: expected a positive int")
        if self.segment_length < 16:
            raise ValueError(f"segment_length={self.segment_length}: too short for a question (>= 16)")
        if not self.curriculum or any(not isinstance(k, int) or k <= 0 for k in self.curriculum):
            raise ValueError(f"curriculum={self.curriculum!r}: expected positive segment counts, e.g. [1, 2, 4, 8]")
        if not (isinstance(self.lr, (int, float)) and 0 < self.lr < 1):
            raise ValueError(f"lr={self.lr!r}: expected a number in (0, 1)")
        if self.persistent_lr is not None and not (
                isinstance(self.persistent_lr, (int, float)) and not isinstance(self.persistent_lr, bool)
                and 0 < self.persistent_lr < 1):
            raise ValueError(f"persistent_lr={self.persistent_lr!r}: expected a number in (0, 1) or None")
        if isinstance(self.question_reads, bool) or not isinstance(self.question_reads, int) or self.question_reads < 0:
            raise ValueError(f"question_reads={self.question_reads!r}: expected an int >= 0")
        if self.bptt_segments is not None and self.bptt_segments <= 0:
            raise ValueError(f"bptt_segments={self.bptt_segments!r}: expected a positive int or None")
        for name in ("warmup_steps", "checkpoint_every", "lora_rank"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name}={v!r}: expected a non-negative int")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio={self.min_lr_ratio}: must lie in [0, 1]")
        for name in ("lm_weight", "kl_weight", "distill_weight", "select_weight", "text_kl_weight"):
            v = getattr(self, name)
            if isinstance(v, bool) or not (isinstance(v, (int, float)) and v >= 0):
                raise ValueError(f"{name}={v!r}: expected a number >= 0")
        if isinstance(self.lm_positions, bool) or not isinstance(self.lm_positions, int) or self.lm_positions <= 0:
            raise ValueError(f"lm_positions={self.lm_positions!r}: expected a positive int")
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip={self.grad_clip}: must be >= 0")
        if self.in_context and (self.lora_rank == 0 or self.lm_weight or self.kl_weight or self.bptt_segments
                                or self.distill_weight or self.select_weight or self.text_kl_weight
                                or self.question_reads):
            raise ValueError("in_context trains the base's LoRA on whole-context prompts: it needs lora_rank > 0 and "
                             "takes no lm_weight, kl_weight, distill_weight, select_weight, text_kl_weight, "
                             "question_reads or bptt_segments")

    @property
    def total_steps(self) -> int:
        return self.steps_per_stage * len(self.curriculum)

    def stage(self, step: int) -> int:
        return min(step // self.steps_per_stage, len(self.curriculum) - 1)

    def context_tokens(self, segments: int) -> int:
        """The target context length (tokens) of a stage with ``segments`` context segments."""
        # Instruction and tags share the first segment; aim the context at ~90% of the room.
        return max(0, int(0.9 * segments * (self.segment_length - 1)) - 80)


def batch_tasks(cfg: TrainConfig, step: int) -> list[str]:
    """The task of each sample of global step ``step``'s batch: ``cfg.tasks`` round robin over the run."""
    start = step * cfg.batch_size
    return [cfg.tasks[i % len(cfg.tasks)] for i in range(start, start + cfg.batch_size)]


def make_batch(cfg: TrainConfig, step: int, tokenizer: Any, bos_token_id: int | None, pad_token_id: int = 0,
               rows: Sequence[int] | None = None) -> Batch:
    """The training batch of global step ``step`` (a pure function of the step); ``rows``: only those samples of it
    (a data-parallel replica's share), each the same sample it is in the whole batch."""
    segments = cfg.curriculum[cfg.stage(step)]
    length = cfg.context_tokens(segments)
    episodes, questions, source = [], [], []
    tasks = batch_tasks(cfg, step)
    for local, j in enumerate(range(len(tasks)) if rows is None else rows):
        task = tasks[j]
        i = step * cfg.batch_size + j
        seed = derive_seed("train", task, i, cfg.seed)
        sample = generate_sample(task, length, seed, tokenizer, num_facts=cfg.num_facts, split="train")
        episode = encode_episode(sample, tokenizer, facts=cfg.select_weight > 0)
        episodes.append(episode)
        if cfg.questions_per_context > 1:
            questions.append(episode)
            source.append(local)
            others = list(sample.other_questions)
            random.Random(seed).shuffle(others)  # which extra questions: a pure function of the sample
            for q, t in others[: cfg.questions_per_context - 1]:
                questions.append(encode_question(sample, tokenizer, q, t))
                source.append(local)
    if cfg.questions_per_context > 1:
        return collate_questions(episodes, questions, source, bos_token_id, pad_token_id)
    return collate(episodes, bos_token_id, pad_token_id)


def make_text_rows(cfg: TrainConfig, step: int, tokenizer: Any, bos_token_id: int | None,
                   replicas: Replicas = Replicas()) -> torch.Tensor | None:
    """The structured-text rows of global step ``step`` for the text KL term (None when it is off); a replica's
    share of them where they split evenly over the replicas, else all of them (the mean is the same)."""
    if not cfg.text_kl_weight:
        return None
    per_segment = cfg.segment_length - (bos_token_id is not None)  # split_segments prepends BOS
    seed = (cfg.seed << 32) ^ step ^ 0x7E47_5EED  # apart from the stories' seeds
    rows = text_rows(tokenizer, cfg.text_kl_rows, cfg.text_kl_segments * per_segment, seed)
    if cfg.text_kl_rows % replicas.world == 0:
        rows = rows[replicas.rank::replicas.world]
    return rows


class StepData(NamedTuple):
    """What one optimizer step reads: the stories and, with the text KL term, structured text."""

    batch: Batch
    text: torch.Tensor | None


class _StepBatches(torch.utils.data.Dataset):
    """Step data indexed by global step, so DataLoader workers can build it ahead of the GPU."""

    def __init__(self, cfg: TrainConfig, tokenizer: Any, bos: int | None, pad: int,
                 replicas: Replicas = Replicas()) -> None:
        self.cfg, self.tokenizer, self.bos, self.pad, self.replicas = cfg, tokenizer, bos, pad, replicas

    def __len__(self) -> int:
        return self.cfg.total_steps

    def __getitem__(self, step: int) -> StepData:
        rows = self.replicas.rows(self.cfg.batch_size)
        return StepData(make_batch(self.cfg, step, self.tokenizer, self.bos, self.pad, rows),
                        make_text_rows(self.cfg, step, self.tokenizer, self.bos, self.replicas))


def _identity(item: StepData) -> StepData:
    return item


def answer_loss(model: nn.Module, batch: Batch, segment_length: int, bos_token_id: int | None,
                bptt_segments: int | None = None, lm_positions: int = 0,
                question_reads: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Read the context with the memory carried, then the loss and accuracy on the answer tokens.

    With ``lm_positions > 0`` the loss also holds the next-token loss of the context at that many
    random positions a segment (see ``context_lm_loss``), averaged with the answer loss by the caller.
    """
    loss, acc, *_ = _losses(model, batch, segment_length, bos_token_id, bptt_segments, lm_positions,
                            question_reads=question_reads)
    return loss, acc


class Losses(NamedTuple):
    """One batch's terms; those not asked for are None."""

    answer: torch.Tensor
    accuracy: torch.Tensor
    context_lm: torch.Tensor | None = None
    context_kl: torch.Tensor | None = None
    context_distill: torch.Tensor | None = None
    write_select: torch.Tensor | None = None


def _losses(model: nn.Module, batch: Batch, segment_length: int, bos_token_id: int | None,
            bptt_segments: int | None, lm_positions: int, kl: bool = False, distill: bool = False,
            select: bool = False, question_reads: int = 0) -> Losses:
    """Answer loss and accuracy; the context's next-token loss and KL to the bare base at
    ``lm_positions`` random positions a segment; with ``distill``, ``context_distill_loss`` of the
    question pass; with ``select``, the write's selection loss against ``batch.context_facts``."""
    b = batch.context.shape[0]
    state = model.init_state(b)
    segments = split_segments(batch.context, batch.context_mask, segment_length, bos_token_id)
    if select and batch.context_facts is None:
        raise ValueError("the selection loss needs batch.context_facts (encode_episode(..., facts=True))")
    facts = (split_aligned(batch.context_facts, batch.context, batch.context_mask, segment_length, bos_token_id)
             if select else [None] * len(segments))
    lm_terms, kl_terms, select_terms = [], [], []
    for k, (ids, mask) in enumerate(segments):
        if bptt_segments is not None and len(segments) - k > bptt_segments:
            state = state.detach()
        targets = {} if facts[k] is None else {"write_targets": facts[k]}
        out, lm_term, kl_term = _segment_terms(model, ids, mask, state, lm_positions, kl, **targets)
        if lm_term is not None:
            lm_terms.append(lm_term)
        if kl_term is not None:
            kl_terms.append(kl_term)
        if targets:
            select_terms.append(out.write_loss)
        state = out.memory_state
    if batch.question_source is not None:  # several questions about one read of a context
        state = state.select(batch.question_source)
    question_only = batch.question_mask & ~batch.answer_mask  # BOS + question: the answer is never written
    for _ in range(question_reads):
        state = model(input_ids=batch.question, attention_mask=question_only, memory_state=state,
                      logits_to_keep=1).memory_state
    answer_len = int(batch.answer_mask.sum(1).max())
    # Logits only where they predict answer tokens: the vocabulary is 262k wide.
    out = model(input_ids=batch.question, attention_mask=batch.question_mask, memory_state=state,
                write=False, logits_to_keep=answer_len + 1, **({"output_hidden_states": True} if distill else {}))
    loss, acc = _answer_terms(out.logits, batch.question, batch.answer_mask, answer_len)
    lm = torch.stack(lm_terms).mean() if lm_terms else None
    kl_loss = torch.stack(kl_terms).mean() if kl_terms else None
    distill_loss = context_distill_loss(model, batch, bos_token_id, out.hidden_states) if distill else None
    select_loss = torch.stack(select_terms).mean() if select_terms else None
    return Losses(loss, acc, lm, kl_loss, distill_loss, select_loss)


def _segment_terms(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, state: Any, lm_positions: int,
                   kl: bool, **extra: Any) -> tuple[Any, torch.Tensor | None, torch.Tensor | None]:
    """One context segment read with ``state``: the model's output and, at ``lm_positions`` random
    positions (0: none), the next-token loss and (``kl``) KL(bare || memory) there."""
    if not (lm_positions and ids.shape[1] > 2):
        return model(input_ids=ids, attention_mask=mask, memory_state=state, logits_to_keep=1, **extra), None, None
    # A few random positions a segment: full 262k-wide logits for every token would not fit.
    pos = torch.randperm(ids.shape[1] - 1)[:lm_positions].sort().values.to(ids.device)
    out = model(input_ids=ids, attention_mask=mask, memory_state=state, logits_to_keep=pos, **extra)
    valid = mask[:, pos] & mask[:, pos + 1]
    target = ids[:, pos + 1].masked_fill(~valid, -100)
    bare = None
    if kl:
        with torch.no_grad(), model.memory_disabled():
            bare = model(input_ids=ids, attention_mask=mask, logits_to_keep=pos).logits
    # Recomputed in backward: otherwise every segment keeps several fp32 copies of its
    # vocabulary-wide logits until the end of the sample (out of GPU memory at 16 segments).
    lm_term, kl_term = torch.utils.checkpoint.checkpoint(context_terms, out.logits, target, valid, bare,
                                                         use_reentrant=False)
    return out, lm_term, kl_term


def text_kl_loss(model: nn.Module, text: torch.Tensor, segment_length: int, bos_token_id: int | None,
                 lm_positions: int) -> torch.Tensor:
    """KL(bare base || memory model) at ``lm_positions`` random positions a segment of ``text``
    (R, N), read segment by segment from a fresh memory with the memory carried."""
    state = model.init_state(text.shape[0])
    mask = torch.ones_like(text, dtype=torch.bool)
    terms = []
    for ids, m in split_segments(text, mask, segment_length, bos_token_id):
        out, _, kl_term = _segment_terms(model, ids, m, state, lm_positions, kl=True)
        if kl_term is not None:
            terms.append(kl_term)
        state = out.memory_state
    if not terms:
        raise ValueError(f"text of {text.shape[1]} tokens gives no segment to score")
    return torch.stack(terms).mean()


def context_distill_loss(model: nn.Module, batch: Batch, bos_token_id: int | None,
                         student: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """How far the question pass's hidden states after each memory layer are from the bare base's
    with the whole context in its window, at the question (and answer) tokens: the relative squared
    error per token, averaged over tokens and layers. ``student``: the question pass's hidden states
    (``output_hidden_states``), whose rows end where the in-context prompts' rows end."""
    ids, mask, _ = in_context_prompts(batch, bos_token_id)
    with torch.no_grad(), model.memory_disabled():
        teacher = model(input_ids=ids, attention_mask=mask, logits_to_keep=1, output_hidden_states=True).hidden_states
    q = batch.question
    m = q.shape[1] - 1  # the question row's BOS column has no counterpart in the prompt
    valid = batch.question_mask[:, 1:]
    if bos_token_id is not None:  # a shorter row's own BOS faces a context token of the prompt
        valid = valid & (q[:, 1:] != bos_token_id)
    n = valid.sum().clamp(min=1)
    terms = []
    for i in model.config.layers:  # hidden_states[i + 1]: layer i's output, the memory's read included
        s, t = student[i + 1][:, 1:].float(), teacher[i + 1][:, -m:].float()
        err = (s - t).pow(2).mean(-1) / t.pow(2).mean(-1).clamp_min(1e-6)
        terms.append((err * valid).sum() / n)
    return torch.stack(terms).mean()


def in_context_prompts(batch: Batch, bos_token_id: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``BOS + context + question + answer`` per question, left-padded so every answer ends at the
    last position: (ids, mask, answer_mask), each (B', N)."""
    source = batch.question_source
    if source is None:
        source = torch.arange(batch.question.shape[0], device=batch.question.device)
    rows = []
    for q in range(batch.question.shape[0]):
        c = int(source[q])
        ctx = batch.context[c][batch.context_mask[c]]
        keep = batch.question_mask[q]
        tail, tail_answer = batch.question[q][keep], batch.answer_mask[q][keep]
        if bos_token_id is not None:  # the question segment's own BOS; the prompt keeps only the first
            tail, tail_answer = tail[1:], tail_answer[1:]
        head = ctx.new_tensor([bos_token_id] if bos_token_id is not None else [])
        ids = torch.cat([head, ctx, tail])
        answer = torch.cat([torch.zeros(len(head) + len(ctx), dtype=torch.bool, device=ids.device), tail_answer])
        rows.append((ids, answer))
    n = max(len(ids) for ids, _ in rows)
    b = len(rows)
    dev = batch.question.device
    ids = torch.zeros(b, n, dtype=torch.long, device=dev)
    mask = torch.zeros(b, n, dtype=torch.bool, device=dev)
    answer_mask = torch.zeros(b, n, dtype=torch.bool, device=dev)
    for i, (x, a) in enumerate(rows):
        ids[i, n - len(x):] = x
        mask[i, n - len(x):] = True
        answer_mask[i, n - len(x):] = a
    return ids, mask, answer_mask


def _in_context_losses(model: nn.Module, batch: Batch, bos_token_id: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Answer loss and accuracy of the base (its LoRA on, the memory off) with the whole context in its window."""
    ids, mask, answer_mask = in_context_prompts(batch, bos_token_id)
    answer_len = int(answer_mask.sum(1).max())
    with model.memory_disabled(keep_lora=True):
        out = model(input_ids=ids, attention_mask=mask, logits_to_keep=answer_len + 1)
    return _answer_terms(out.logits, ids, answer_mask, answer_len)


def _answer_terms(logits: torch.Tensor, ids: torch.Tensor, answer_mask: torch.Tensor,
                  answer_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy and all-tokens-right accuracy on the answers, which end every row."""
    logits = logits[:, :-1].float()
    targets = ids[:, -answer_len:]
    mask = answer_mask[:, -answer_len:]
    loss = F.cross_entropy(logits[mask], targets[mask])
    correct = (logits.argmax(-1) == targets) | ~mask
    return loss, correct.all(1).float().mean()


def context_terms(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor,
                  bare_logits: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Next-token loss at the kept positions and, with ``bare_logits``, KL(bare || memory) there.

    Args:
        logits: (B, P, V) of the memory model at P positions; bare_logits the same of the bare base.
        target: (B, P) next tokens, -100 where not scored; valid: (B, P) bool, where scored.
    """
    logp = F.log_softmax(logits.float(), -1)
    n = valid.sum().clamp(min=1)
    lm = F.nll_loss(logp.flatten(0, 1), target.flatten(), ignore_index=-100, reduction="sum") / n
    if bare_logits is None:
        return lm, None
    per_pos = F.kl_div(logp, F.log_softmax(bare_logits.float(), -1), log_target=True, reduction="none").sum(-1)
    return lm, (per_pos * valid).sum() / n


@torch.no_grad()
def validate(model: nn.Module, tokenizer: Any, tasks: list[str], length: int, n: int, segment_length: int,
             seed: int = 0, batch_size: int = 32, in_context: bool = False, question_reads: int = 0) -> dict[str, float]:
    """Answer accuracy (every answer token right, teacher-forced) on ``n`` test samples a task.

    A quick check during and after training; ``gma6 eval`` is the benchmark (generation + scorer).
    ``in_context``: the whole context in the base's window, the memory off, LoRA on (see TrainConfig).
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    pad = getattr(tokenizer, "pad_token_id", None) or 0
    result = {}
    for task in dict.fromkeys(tasks):  # a task named twice (a training mix's weight) is measured once
        samples = [generate_sample(task, length, derive_seed("test", task, i, seed), tokenizer, split="test")
                   for i in range(n)]
        hits = 0.0
        for s in range(0, n, batch_size):
            chunk = [encode_episode(x, tokenizer) for x in samples[s : s + batch_size]]
            batch = collate(chunk, bos, pad).to(model.device)
            if in_context:
                _, acc = _in_context_losses(model, batch, bos)
            else:
                _, acc = answer_loss(model, batch, segment_length, bos, question_reads=question_reads)
            hits += float(acc) * len(chunk)
        result[task] = hits / n
    return result


def lr_factor(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.total_steps - cfg.warmup_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


PERSISTENT_PARAMETERS = ("controller.persistent", "controller.persistent_logit")


def parameter_groups(model: nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """AdamW's parameter groups: one at ``cfg.lr``, and with ``cfg.persistent_lr`` the persistent slots and their
    logit bias in a second group at that rate (the scheduler scales both alike)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if cfg.persistent_lr is None:
        return [{"params": [p for _, p in named], "lr": cfg.lr}]
    persistent = [p for n, p in named if n in PERSISTENT_PARAMETERS]
    if not persistent:
        raise ValueError(f"persistent_lr={cfg.persistent_lr} but the model has no trainable persistent slots "
                         "(GMA6Config.persistent_slots = 0)")
    rest = [p for n, p in named if n not in PERSISTENT_PARAMETERS]
    return [{"params": rest, "lr": cfg.lr}, {"params": persistent, "lr": cfg.persistent_lr}]


def train(
    model: nn.Module,
    tokenizer: Any,
    cfg: TrainConfig,
    out_dir: str | os.PathLike,
    resume: bool = True,
    max_steps: int | None = None,
    progress: bool = True,
    command: str | None = None,
    on_log: Callable[[dict[str, Any]], None] | None = None,
    num_workers: int = 0,
    time_limit: float | None = None,
) -> dict[str, Any]:
    """Train the memory (and LoRA when asked); checkpoints and logs go to ``out_dir``.

    Under a launcher that set up ``torch.distributed`` (torchrun, accelerate), each process takes its rows of every
    batch and the gradients are averaged (``gma6.distributed``); the first process writes the files. The answer
    loss is weighted so that the step equals one process's over the whole batch.

    Args:
        model: a memory model from ``attach_memory`` (gated or RMT).
        tokenizer: the base's tokenizer (``encode(text, add_special_tokens=False)``).
        cfg: what to do.
        out_dir: ``log.jsonl``, ``loss.png``, ``checkpoint/`` (resumable) and ``adapter/`` (final).
        resume: continue from ``out_dir/checkpoint`` if it is there (exactly: weights, optimizer, scheduler, RNG,
            data position); ``log.jsonl``'s records of steps after it, from a killed run, are dropped.
        max_steps: stop after this global step (for tests and time-boxed runs); None runs all.
        progress: show a progress bar.
        command: the command line, recorded beside the adapter.
        on_log: called with every log record.
        num_workers: processes building batches ahead (0: in this process).
        time_limit: seconds; after the step that crosses it, save a checkpoint and stop (resume
            later). For time-boxed machines: the run ends cleanly instead of being killed.

    Returns:
        The last log record.
    """
    out = Path(out_dir)
    replicas = Replicas.current()  # under torchrun / accelerate: this process's share of each batch
    replicas.rows(cfg.batch_size)  # refused here, before any work, when it does not split evenly
    if replicas.main:
        out.mkdir(parents=True, exist_ok=True)
    replicas.barrier()
    bos = getattr(tokenizer, "bos_token_id", None)
    pad = getattr(tokenizer, "pad_token_id", None) or 0
    if cfg.lora_rank and not getattr(model.config, "lora_rank", 0):
        model.add_lora(cfg.lora_rank)  # saved with the adapter (lora_adapter.safetensors)
    if cfg.select_weight and getattr(model.config, "write_rule", None) != "tokens":
        raise ValueError("select_weight supervises the tokens write: the model needs write_rule='tokens'")
    params = trainable_parameters(model)
    if not params:
        raise ValueError("the model has no trainable parameters")
    opt = torch.optim.AdamW(parameter_groups(model, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(cfg, s))
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    step = 0
    ckpt = out / CHECKPOINT_DIR
    if resume and (ckpt / TRAINER_STATE).exists():
        step = load_checkpoint(ckpt, model, opt, sched, cfg)
        if replicas.main:
            trim_log(out / "log.jsonl", step)
    if time_limit is not None and not time_limit > 0:
        raise ValueError(f"time_limit={time_limit!r}: expected a positive number of seconds")
    started = time.monotonic()
    last = min(cfg.total_steps, max_steps) if max_steps is not None else cfg.total_steps
    from tqdm.auto import tqdm

    bar = tqdm(total=last, initial=step, desc="training", disable=not (progress and replicas.main))
    record: dict[str, Any] = {}
    skipped = run_of_skips = 0
    t0, tokens = time.perf_counter(), 0
    model.train()
    if num_workers:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    batches = torch.utils.data.DataLoader(
        _StepBatches(cfg, tokenizer, bos, pad, replicas), batch_size=None, sampler=range(step, last),
        num_workers=num_workers, prefetch_factor=4 if num_workers else None, collate_fn=_identity,
        generator=torch.Generator(),  # its seed draw must not advance the global RNG a resume restores
    )
    for batch, text in batches:
        batch = batch.to(model.device)
        if cfg.in_context:
            loss, acc, lm, kl, distill, select = Losses(*_in_context_losses(model, batch, bos))
        else:
            loss, acc, lm, kl, distill, select = _losses(
                model, batch, cfg.segment_length, bos, cfg.bptt_segments,
                cfg.lm_positions if cfg.lm_weight or cfg.kl_weight else 0, kl=cfg.kl_weight > 0,
                distill=cfg.distill_weight > 0, select=cfg.select_weight > 0, question_reads=cfg.question_reads)
        if replicas.world > 1:  # the answer loss and accuracy as the whole batch's means, whatever each holds
            w_loss, w_acc = replicas.shares([float(batch.answer_mask.sum()), float(batch.question.shape[0])],
                                            model.device)
            loss, acc = loss * w_loss, acc * w_acc
        total = loss
        if lm is not None and cfg.lm_weight:
            total = total + cfg.lm_weight * lm
        if kl is not None:
            total = total + cfg.kl_weight * kl
        if distill is not None:
            total = total + cfg.distill_weight * distill
        if select is not None:
            total = total + cfg.select_weight * select
        text_kl = None
        if text is not None:
            text_kl = text_kl_loss(model, text.to(model.device), cfg.segment_length, bos, cfg.lm_positions)
            total = total + cfg.text_kl_weight * text_kl
        total.backward()
        replicas.average_gradients(params)  # the same gradients, so the same steps, on every replica
        gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        # A non-finite gradient (an overflow in one batch) would make every weight NaN for good: skip that
        # update, as a loss scaler does, and stop when it keeps happening. One host sync a step.
        if bool(torch.isfinite(gnorm)):
            opt.step()
            run_of_skips = 0
        else:
            skipped += 1
            run_of_skips += 1
            if run_of_skips >= MAX_SKIPPED_IN_A_ROW:
                raise FloatingPointError(
                    f"step {step + 1}: the gradient was not finite at {run_of_skips} steps in a row (loss "
                    f"{float(total.detach())}); the last checkpoint in {ckpt} holds the weights before them")
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        tokens += int(batch.context_mask.sum()) + int(batch.question_mask.sum())  # questions count once each
        bar.update(1)
        if step % cfg.log_every == 0 or step == last:
            dt = time.perf_counter() - t0
            terms = replicas.mean({
                "loss": float(loss.detach()), "acc": float(acc),
                "context_lm_loss": float(lm.detach()) if lm is not None else None,
                "context_kl": float(kl.detach()) if kl is not None else None,
                "context_distill": float(distill.detach()) if distill is not None else None,
                "write_select": float(select.detach()) if select is not None else None,
                "text_kl": float(text_kl.detach()) if text_kl is not None else None}, model.device)
            digits = {"loss": 5, "acc": 4, "context_lm_loss": 5, "context_kl": 6, "context_distill": 5,
                      "write_select": 5, "text_kl": 6}
            record = {"step": step, "stage": cfg.stage(step - 1), "segments": cfg.curriculum[cfg.stage(step - 1)],
                      **{k: None if v is None else round(v, digits[k]) for k, v in terms.items()},
                      "lr": sched.get_last_lr()[0], "grad_norm": round(float(gnorm), 4),
                      "tokens_per_s": round(replicas.total(tokens, model.device) / dt, 1), "time": time.time()}
            if replicas.world > 1:
                record["processes"] = replicas.world
            if skipped:  # updates skipped for a non-finite gradient since the last record
                record["skipped_steps"], skipped = skipped, 0
            if replicas.main:
                with open(out / "log.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
            bar.set_postfix(loss=record["loss"], acc=record["acc"], seg=record["segments"])
            if on_log:
                on_log(record)
            t0, tokens = time.perf_counter(), 0
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < last:
            if replicas.main:
                save_checkpoint(ckpt, model, opt, sched, cfg, step)
            replicas.barrier()
        # the replicas stop together: the first whose clock runs out decides for all
        if (time_limit is not None and step < last
                and replicas.any(time.monotonic() - started > time_limit, model.device)):
            record = {**record, "stopped": "time_limit", "stopped_at_step": step}
            break
    bar.close()
    model.eval()
    if replicas.main:
        save_checkpoint(ckpt, model, opt, sched, cfg, step)
        if step >= cfg.total_steps:
            model.save_pretrained(out / "adapter")
            meta = {"train_config": dataclasses.asdict(cfg), "steps": step, "command": command,
                    "processes": replicas.world}
            atomic_write_text(out / "adapter" / "training.json", json.dumps(meta, indent=2) + "\n")
        plot_log(out / "log.jsonl", out / "loss.png")
    replicas.barrier()  # no replica returns (or exits) before the files are written
    return record


def save_checkpoint(directory: Path, model: nn.Module, opt: torch.optim.Optimizer,
                    sched: Any, cfg: TrainConfig, step: int) -> None:
    """Weights, optimizer, scheduler, RNG and data position; each file written atomically."""
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    state = {
        "step": step,
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "python_rng": json.dumps(random.getstate()),
        "train_config": json.dumps(dataclasses.asdict(cfg)),
        "trainable": [n for n, p in model.named_parameters() if p.requires_grad],
        "trainable_values": [p.detach().cpu() for p in model.parameters() if p.requires_grad],
    }
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    atomic_write(directory / TRAINER_STATE, lambda tmp: torch.save(state, tmp))


def load_checkpoint(directory: Path, model: nn.Module, opt: torch.optim.Optimizer, sched: Any, cfg: TrainConfig) -> int:
    """Restore what ``save_checkpoint`` wrote; return the step to continue from."""
    state = torch.load(directory / TRAINER_STATE, map_location="cpu", weights_only=True)
    saved = json.loads(state["train_config"])
    mine = dataclasses.asdict(cfg)
    fixed = ("tasks", "segment_length", "curriculum", "steps_per_stage", "batch_size", "seed", "num_facts", "lora_rank",
             "lm_weight", "lm_positions", "kl_weight", "questions_per_context", "in_context", "distill_weight",
             "select_weight", "text_kl_weight", "text_kl_rows", "text_kl_segments", "question_reads")
    defaults = dataclasses.asdict(TrainConfig())  # fields added after a checkpoint was written
    diff = {k: (saved.get(k, defaults[k]), mine[k]) for k in fixed if saved.get(k, defaults[k]) != mine[k]}
    if diff:
        raise ValueError(f"{directory}: checkpoint was made with other settings {diff}; use another output folder")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if names != state["trainable"]:
        raise ValueError(f"{directory}: checkpoint's trainable parameters do not match this model's")
    with torch.no_grad():
        for p, v in zip((p for p in model.parameters() if p.requires_grad), state["trainable_values"]):
            p.copy_(v.to(p.device))
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    rs = json.loads(state["python_rng"])
    random.setstate((rs[0], tuple(rs[1]), rs[2]))
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return int(state["step"])


def read_log(log: Path) -> list[dict[str, Any]]:
    """The records of a ``log.jsonl``; a line that is not a whole JSON object (a write cut off by a kill) is
    skipped."""
    return _records(log.read_text())


def _records(text: str) -> list[dict[str, Any]]:
    rows = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def trim_log(log: Path, step: int) -> None:
    """Resuming from a checkpoint at ``step``: drop the records of later steps (logged before a kill, their updates
    lost with it, run again now) and any line cut off, so that each step is logged once. Rewritten atomically."""
    if not log.exists():
        return
    text = log.read_text()
    kept = [r for r in _records(text) if isinstance(r.get("step"), int) and r["step"] <= step]
    new = "".join(json.dumps(r) + "\n" for r in kept)
    if new != text:
        atomic_write_text(log, new)


def plot_log(log: Path, png: Path) -> None:
    """Loss and accuracy against step, with the curriculum stages marked."""
    if not log.exists():
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_log(log)
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in rows]
    ax.plot(steps, [r["loss"] for r in rows], label="answer loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax2 = ax.twinx()
    ax2.plot(steps, [r["acc"] for r in rows], color="tab:orange", alpha=0.7, label="answer accuracy (batch)")
    ax2.set_ylabel("accuracy")
    ax2.set_ylim(0, 1)
    prev = None
    for r in rows:
        if r["segments"] != prev:
            ax.axvline(r["step"], color="grey", lw=0.5)
            ax.text(r["step"], ax.get_ylim()[1], f"{r['segments']} seg", fontsize=7, va="top")
            prev = r["segments"]
    fig.legend(loc="upper right")
    fig.tight_layout()
    atomic_write(png, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
