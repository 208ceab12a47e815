"""Accuracy on BABILong-style samples: the bare base against memory models, on the same samples.

Every cell (task x context length) draws its samples once (``split="test"``, the model's
tokenizer) and every system answers those same samples by greedy generation; answers are
scored with BABILong's rule (:func:`gma6.data.score`).

A sample is tokenised as in training (:func:`gma6.episodes.encode_episode`): ``context`` is
the instruction plus ``<context>...`` text, ``question`` is ``</context>``, the question and
``Answer:``. The systems see these token ids as follows:

* ``base_full``: the bare base reads ``BOS + context + question`` in one pass. Skipped (a row
  with ``accuracy`` None and a ``skipped`` reason) when a prompt of the cell plus the answer
  would exceed the model's ``max_position_embeddings`` or ``max_full_tokens``.
* ``base_last_segment``: the bare base sees one segment of at most ``segment_length`` tokens:
  ``BOS + the last (segment_length - 1 - len(question)) context tokens + question``, i.e. the
  question segment preceded by as much of the end of the context as fits. When the whole
  prompt fits in one segment this is exactly ``base_full``'s prompt (the answer is reused).
* ``base_question``: the bare base sees ``BOS + question`` only (a floor: what it guesses
  without the context). Not run by default.
* ``memory`` (``rmt`` for an RMT adapter): the memory model reads the context segment by
  segment (each segment ``BOS`` + up to ``segment_length - 1`` tokens, the memory carried),
  then answers from the question segment ``BOS + question`` with the memory read-only. A fresh
  (untrained) gated memory changes nothing, so it answers exactly as ``base_question``.

Nothing here names a device: inputs go where the model's parameters are.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .data.generator import Sample, format_length, generate_samples, parse_length
from .data.scorer import score
from .data.vocab import check_task
from .episodes import Episode, collate, encode_episode
from .io import atomic_write, atomic_write_text

BASE_SYSTEMS: tuple[str, ...] = ("base_full", "base_last_segment", "base_question")
MEMORY_SYSTEM = "memory"
# A control: every question is asked after reading another sample's context (the next one in the
# cell), so the memory holds no fact about it. What this scores is the adapter's prior (and its LoRA's);
# the gap to "memory" is what it recalls.
OTHER_CONTEXT_SYSTEM = "memory_other_context"
SYSTEMS: tuple[str, ...] = (*BASE_SYSTEMS, MEMORY_SYSTEM, OTHER_CONTEXT_SYSTEM)
DEFAULT_SYSTEMS: tuple[str, ...] = ("base_full", "base_last_segment", MEMORY_SYSTEM)
DEFAULT_MAX_FULL_TOKENS = 32768
SCHEMA_KEYS: tuple[str, ...] = ("model", "adapter", "device", "dtype", "date", "segment_length", "command", "rows")
ROW_KEYS: tuple[str, ...] = ("system", "task", "length", "n", "accuracy", "seconds")


@dataclass
class _Cell:
    task: str
    length: int
    label: str
    samples: list[Sample]
    episodes: list[Episode]


@dataclass
class _Memory:
    label: str
    source: str | None  # adapter folder, "fresh" or None (a model passed in)
    model: nn.Module | None  # attached now, or None: attach from ``spec`` when its turn comes
    spec: Any
    owned: bool  # attached here, so detached here


# --------------------------------------------------------------------------- helpers


def _is_memory_model(model: Any) -> bool:
    return hasattr(model, "init_state") and hasattr(model, "base")


def _param(model: nn.Module) -> torch.Tensor:
    return next(model.parameters())


def _max_positions(base: nn.Module) -> int | None:
    cfg = getattr(base, "config", None)
    if cfg is None:
        return None
    text = getattr(cfg, "text_config", None) or cfg
    return getattr(text, "max_position_embeddings", None) or getattr(cfg, "max_position_embeddings", None)


def _special(tokenizer: Any, model: nn.Module) -> tuple[int | None, int, set[int]]:
    """``(bos, pad, eos_ids)`` from the tokenizer, the model's configs filling gaps."""
    gen = getattr(model, "generation_config", None)
    cfg = getattr(model, "config", None)

    def pick(name: str) -> Any:
        for src in (tokenizer, gen, cfg):
            v = getattr(src, name, None) if src is not None else None
            if v is not None:
                return v
        return None

    bos = pick("bos_token_id")
    eos = pick("eos_token_id")
    eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
    for src in (gen, cfg):  # the model may stop at more tokens than the tokenizer names
        v = getattr(src, "eos_token_id", None) if src is not None else None
        eos_ids |= set(v if isinstance(v, (list, tuple)) else [v] if v is not None else [])
    pad = pick("pad_token_id")
    if pad is None:
        pad = min(eos_ids) if eos_ids else 0
    return bos, int(pad), {int(e) for e in eos_ids}


def _left_pad(prompts: Sequence[Sequence[int]], pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
        mask[i, width - len(p):] = 1
    return ids.to(device), mask.to(device)


def _new_tokens(out: torch.Tensor, prompt_width: int, eos_ids: set[int]) -> list[list[int]]:
    rows = []
    for row in out[:, prompt_width:].tolist():
        cut = next((k for k, t in enumerate(row) if t in eos_ids), len(row))
        rows.append(row[:cut])
    return rows


def _decode(tokenizer: Any, ids: list[int]) -> str:
    try:
        return tokenizer.decode(ids, skip_special_tokens=True)
    except TypeError:
        return tokenizer.decode(ids)


def _generate(model: nn.Module, prompts: Sequence[Sequence[int]], pad: int, eos_ids: set[int],
              max_new_tokens: int, **extra: Any) -> list[list[int]]:
    """Greedy answers (new token ids, cut at EOS) to left-padded prompts."""
    ids, mask = _left_pad(prompts, pad, _param(model).device)
    kw: dict[str, Any] = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
    gen = getattr(getattr(model, "base", model), "generation_config", None)
    # Greedy: silence sampling settings a checkpoint may carry (they would only warn).
    for name in ("temperature", "top_p", "top_k"):
        if gen is not None and getattr(gen, name, None) is not None:
            kw[name] = None
    out = model.generate(input_ids=ids, attention_mask=mask, **kw, **extra)
    return _new_tokens(out, ids.shape[1], eos_ids)


def answer_text(output: str, first_line: bool = True) -> str:
    """What is scored: the output's first non-empty line, or all of it.

    A base model that has answered tends to go on with the next ``Question: ...`` line, whose
    names the scorer would count as part of the answer; the answer itself is the first line.
    """
    if not first_line:
        return output
    return next((line for line in output.splitlines() if line.strip()), "")


def last_segment_prompt(episode: Episode, segment_length: int, bos: int | None) -> list[int]:
    """``BOS + tail of the context + question`` in at most ``segment_length`` tokens (see module doc)."""
    head = [bos] if bos is not None else []
    keep = max(0, segment_length - len(head) - len(episode.question))
    tail = episode.context[len(episode.context) - keep:] if keep else []
    return head + tail + episode.question


def full_prompt(episode: Episode, bos: int | None) -> list[int]:
    """``BOS + context + question``: the whole BABILong prompt."""
    return ([bos] if bos is not None else []) + episode.context + episode.question


def question_prompt(episode: Episode, bos: int | None) -> list[int]:
    """``BOS + question``: the question segment without the answer."""
    return ([bos] if bos is not None else []) + episode.question


def _length_counts(n: int | Mapping[Any, int], lengths: Sequence[int], limit: int | None) -> dict[int, int]:
    if isinstance(n, Mapping):
        by = {parse_length(k): v for k, v in n.items()}
        missing = [format_length(x) for x in lengths if x not in by]
        if missing:
            raise ValueError(f"n gives no sample count for lengths {missing}")
        counts = {x: by[x] for x in lengths}
    else:
        counts = {x: n for x in lengths}
    for x, v in counts.items():
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"samples per cell must be a positive int, got {v!r} for length {format_length(x)}")
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0:
            raise ValueError(f"limit={limit!r}: expected a positive int")
        counts = {x: min(v, limit) for x, v in counts.items()}
    return counts


def _memory_label(model: nn.Module | None, spec: Any) -> str:
    mtype = None
    cfg = getattr(model, "config", None) if model is not None else None
    if cfg is not None:
        mtype = getattr(cfg, "memory_type", None)
    if mtype is None:
        from .config import GMA6Config

        if isinstance(spec, GMA6Config):
            mtype = spec.memory_type
        elif isinstance(spec, (str, os.PathLike)):
            mtype = GMA6Config.load(spec).memory_type
    return "rmt" if mtype == "rmt" else MEMORY_SYSTEM


def _memories(model_or_base: nn.Module, adapter: Any) -> tuple[nn.Module, list[_Memory]]:
    """The bare base and the memory systems to run (attached one at a time, later)."""
    from .config import GMA6Config

    specs = [] if adapter is None else list(adapter) if isinstance(adapter, (list, tuple)) else [adapter]
    mems: list[_Memory] = []
    if _is_memory_model(model_or_base):
        if specs:
            raise ValueError("pass the bare base model to evaluate adapters: a memory model is already attached to it")
        base = model_or_base.base
        mems.append(_Memory(_memory_label(model_or_base, None), None, model_or_base, None, owned=False))
    else:
        base = model_or_base
    for spec in specs:
        if isinstance(spec, (str, os.PathLike)):
            if not Path(spec).is_dir():
                raise FileNotFoundError(f"{spec}: no such adapter folder")
            mems.append(_Memory(_memory_label(None, spec), str(spec), None, spec, owned=True))
        elif isinstance(spec, GMA6Config):
            mems.append(_Memory(_memory_label(None, spec) + "-fresh", "fresh", None, spec, owned=True))
        elif isinstance(spec, nn.Module) and _is_memory_model(spec):
            if spec.base is not base:
                raise ValueError("a memory model passed as adapter must be attached to the same base")
            mems.append(_Memory(_memory_label(spec, None), None, spec, None, owned=False))
        else:
            raise TypeError(f"adapter must be a folder, a GMA6Config or a memory model, got {type(spec).__name__}")
    if sum(m.model is not None and not m.owned for m in mems) > 1 or (
        any(m.model is not None and not m.owned for m in mems) and any(m.owned for m in mems)
    ):
        raise ValueError("several memories can only be compared when evaluate attaches them (pass folders or configs)")
    # Unique labels: the kind, then the adapter folder's name where kinds repeat.
    seen: dict[str, int] = {}
    for m in mems:
        seen[m.label] = seen.get(m.label, 0) + 1
    used: set[str] = set()
    for m in mems:
        if seen[m.label] > 1 and m.source not in (None, "fresh"):
            m.label = f"{m.label}@{Path(m.source).name}"
        label, k = m.label, 2
        while label in used:
            label, k = f"{m.label}#{k}", k + 1
        m.label = label
        used.add(label)
    return base, mems


def _attach(base: nn.Module, m: _Memory) -> nn.Module:
    if m.model is not None:
        return m.model
    from .config import GMA6Config
    from .model import attach_memory, load_adapter

    if isinstance(m.spec, GMA6Config):
        return attach_memory(base, m.spec)
    return load_adapter(base, m.spec)


def _read_context(model: nn.Module, episodes: list[Episode], segment_length: int, bos: int | None, pad: int) -> Any:
    batch = collate(episodes, bos, pad, with_answer=False).to(_param(model).device)
    read = getattr(model, "read", None)
    if read is not None:
        return read(batch.context, segment_length=segment_length, attention_mask=batch.context_mask, bos_token_id=bos)
    from .model import split_segments

    state = model.init_state(len(episodes))
    for ids, mask in split_segments(batch.context, batch.context_mask, segment_length, bos):
        state = model(input_ids=ids, attention_mask=mask, memory_state=state, logits_to_keep=1).memory_state
    return state


def _read_questions(model: nn.Module, episodes: list[Episode], segment_length: int, bos: int | None, pad: int,
                    state: Any) -> Any:
    """``state`` after the memory model has read each episode's question prompt (no answer) as a segment."""
    # read() packs each row's real tokens first, so left padding reads as the prompt alone
    ids, mask = _left_pad([question_prompt(e, bos) for e in episodes], pad, _param(model).device)
    return model.read(ids, segment_length=segment_length, memory_state=state, attention_mask=mask)


def _segments(n_tokens: int, segment_length: int, bos: int | None) -> int:
    step = segment_length - (bos is not None)
    return max(1, math.ceil(n_tokens / step))


# --------------------------------------------------------------------------- evaluate


def evaluate(
    model_or_base: nn.Module,
    tokenizer: Any,
    tasks: Sequence[str],
    lengths: Sequence[int | str],
    n: int | Mapping[Any, int],
    segment_length: int = 512,
    seed: int = 0,
    systems: Sequence[str] = DEFAULT_SYSTEMS,
    adapter: Any = None,
    max_new_tokens: int = 8,
    batch_size: int = 8,
    progress: bool = True,
    limit: int | None = None,
    max_full_tokens: int | None = DEFAULT_MAX_FULL_TOKENS,
    record_outputs: bool = True,
    first_line: bool = True,
    on_row: Callable[[dict[str, Any], dict[str, Any]], None] | None = None,
    question_reads: int = 0,
) -> dict[str, Any]:
    """Answer the same test samples with each system; return the results as a JSON-ready dict.

    Args:
        model_or_base: a bare causal LM, or a memory model (its base then gives the base systems).
        tokenizer: the model's tokenizer (``encode(text, add_special_tokens=False)``, ``decode``,
            ``bos_token_id``, ``pad_token_id``, ``eos_token_id``).
        tasks: e.g. ``["qa1", "qa2"]``.
        lengths: context lengths, e.g. ``["0k", "1k", 4096]``.
        n: samples per cell: an int, or ``{length: count}`` for fewer at long lengths.
        segment_length: tokens per segment, BOS included (memory reading, ``base_last_segment``).
        seed: base seed of the test samples.
        systems: any of :data:`SYSTEMS`; ``"memory"`` runs every memory model given (skipped,
            with a note, when there is none); ``"memory_other_context"`` runs each of them as the
            control that reads another sample's context before the question (labelled
            ``<memory label>_other_context``).
        adapter: memory systems besides a memory model passed in: an adapter folder, a
            ``GMA6Config`` (a fresh memory) or a memory model on the same base; or a list of them
            (each attached in turn, then detached).
        max_new_tokens: greedy answer length.
        batch_size: prompts per ``generate`` call (left padded).
        progress: show a progress bar.
        limit: cap on samples per cell (smoke runs).
        max_full_tokens: longest prompt ``base_full`` runs (None: only the model's limit).
        record_outputs: keep every answer under ``"outputs"``.
        first_line: score only the output's first non-empty line (see :func:`answer_text`); False
            scores the whole output, as BABILong does.
        on_row: called with ``(row, results_so_far)`` after each row (e.g. to save partial results).
        question_reads: memory systems write the question (BOS + question, no answer) into the memory this many
            times after the context and before answering it: a read of what the question's first pass found
            (an inference-time probe of a second read hop; 0: the question is only asked).

    Returns:
        ``{"model", "adapter", "device", "dtype", "date", "segment_length", "command", "rows", ...}``
        with one row ``{"system", "task", "length", "n", "accuracy", "seconds", ...}`` per cell.
    """
    tasks = [check_task(t) for t in tasks]
    if not tasks:
        raise ValueError("tasks is empty")
    lens = [parse_length(x) for x in lengths]
    if not lens:
        raise ValueError("lengths is empty")
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown:
        raise ValueError(f"unknown systems {unknown}; valid systems are {', '.join(SYSTEMS)}")
    if isinstance(segment_length, bool) or not isinstance(segment_length, int) or segment_length < 16:
        raise ValueError(f"segment_length={segment_length!r}: expected an int >= 16")
    if batch_size <= 0 or max_new_tokens <= 0:
        raise ValueError("batch_size and max_new_tokens must be positive")
    if isinstance(question_reads, bool) or not isinstance(question_reads, int) or question_reads < 0:
        raise ValueError(f"question_reads={question_reads!r}: expected an int >= 0")
    counts = _length_counts(n, lens, limit)
    if OTHER_CONTEXT_SYSTEM in systems and min(counts.values()) < 2:
        raise ValueError(f"{OTHER_CONTEXT_SYSTEM} needs at least 2 samples a cell (another sample's context "
                         f"to read); got {min(counts.values())}")

    base, mems = _memories(model_or_base, adapter)
    bos, pad, eos_ids = _special(tokenizer, base)
    p = _param(base)
    limit_tokens = _max_positions(base)
    if max_full_tokens is not None:
        limit_tokens = min(limit_tokens or max_full_tokens, max_full_tokens)
    notes: list[str] = []
    if (MEMORY_SYSTEM in systems or OTHER_CONTEXT_SYSTEM in systems) and not mems:
        notes.append("memory: skipped (no adapter given)")
    base_systems = [s for s in BASE_SYSTEMS if s in systems]
    run_mems = mems if MEMORY_SYSTEM in systems or OTHER_CONTEXT_SYSTEM in systems else []
    variants = [v for v in (MEMORY_SYSTEM, OTHER_CONTEXT_SYSTEM) if v in systems]  # per memory model

    def label(m: _Memory, variant: str) -> str:
        return m.label if variant == MEMORY_SYSTEM else f"{m.label}_other_context"

    result: dict[str, Any] = {
        "model": str(getattr(base.config, "_name_or_path", "") or type(base).__name__),
        "adapter": next((m.source for m in run_mems), None),
        "device": str(p.device),
        "device_name": torch.cuda.get_device_name(p.device) if p.device.type == "cuda" else platform.processor() or platform.machine(),
        "dtype": str(p.dtype).replace("torch.", ""),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "segment_length": segment_length,
        "command": None,
        "tasks": tasks,
        "lengths": [format_length(x) for x in lens],
        "samples": {format_length(x): counts[x] for x in lens},
        "seed": seed,
        "split": "test",
        "max_new_tokens": max_new_tokens,
        "question_reads": question_reads,
        "max_full_tokens": limit_tokens,
        "scoring": "gma6.data.score (BABILong) on " + ("the first line of the output" if first_line else "the whole output"),
        "systems": base_systems + [label(m, v) for m in run_mems for v in variants],
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__},
        "rows": [],
    }
    if len(run_mems) > 1:
        result["adapters"] = [{"system": m.label, "adapter": m.source} for m in run_mems]
    if notes:
        result["notes"] = notes
    if record_outputs:
        result["outputs"] = []

    # The samples, once per cell, shared by every system.
    cells: list[_Cell] = []
    for x in lens:
        for t in tasks:
            samples = generate_samples(t, x, counts[x], split="test", seed=seed, tokenizer=tokenizer)
            cells.append(_Cell(t, x, format_length(x), samples, [encode_episode(s, tokenizer) for s in samples]))

    from tqdm.auto import tqdm

    total = sum(len(c.samples) for c in cells) * (len(base_systems) + len(run_mems) * len(variants))
    bar = tqdm(total=total, desc="eval", unit="sample", disable=not progress)

    def emit(system: str, cell: _Cell, answers: list[str] | None, seconds: float, extra: dict[str, Any]) -> None:
        row: dict[str, Any] = {"system": system, "task": cell.task, "length": cell.label, "length_tokens": cell.length,
                               "n": len(cell.samples)}
        if answers is None:
            row.update(accuracy=None, correct=None, seconds=round(seconds, 3))
        else:
            ok = [score(answer_text(a, first_line), s.target, s.question, s.task) for a, s in zip(answers, cell.samples)]
            row.update(accuracy=round(sum(ok) / len(ok), 4), correct=sum(ok), seconds=round(seconds, 3))
            if record_outputs:
                for i, (a, s, c) in enumerate(zip(answers, cell.samples, ok)):
                    result["outputs"].append({"system": system, "task": cell.task, "length": cell.label, "index": i,
                                              "seed": s.seed, "target": s.target, "output": a, "correct": c})
        row.update(extra)
        result["rows"].append(row)
        if on_row is not None:
            on_row(row, result)

    def answer(model: nn.Module, prompts: list[list[int]], **extra: Any) -> list[str]:
        outs: list[str] = []
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i:i + batch_size]
            outs += [_decode(tokenizer, ids) for ids in _generate(model, chunk, pad, eos_ids, max_new_tokens, **extra)]
            bar.update(len(chunk))
        return outs

    ctx = torch.inference_mode()
    with ctx:
        # Bare base systems. Identical prompts are answered once: base_last_segment at short lengths
        # (the whole prompt fits one segment), base_question at every length after the first (sample
        # i has the same story, so the same question, at every length).
        bare = mems[0].model if mems and mems[0].model is not None else None
        disabled = getattr(bare, "memory_disabled", None)
        cache: dict[tuple[int, ...], str] = {}
        for cell in cells:
            for system in base_systems:
                bar.set_description(f"{system} {cell.task} {cell.label}")
                if system == "base_full":
                    prompts = [full_prompt(e, bos) for e in cell.episodes]
                elif system == "base_last_segment":
                    prompts = [last_segment_prompt(e, segment_length, bos) for e in cell.episodes]
                else:
                    prompts = [question_prompt(e, bos) for e in cell.episodes]
                longest = max(len(q) for q in prompts)
                extra: dict[str, Any] = {"prompt_tokens": round(sum(map(len, prompts)) / len(prompts), 1)}
                if system == "base_full" and limit_tokens is not None and longest + max_new_tokens > limit_tokens:
                    extra["skipped"] = (f"prompt of {longest} tokens (+{max_new_tokens} to generate) exceeds "
                                        f"the limit of {limit_tokens} tokens")
                    bar.update(len(prompts))
                    emit(system, cell, None, 0.0, extra)
                    continue
                t0 = time.perf_counter()
                todo = sorted({tuple(q) for q in prompts if tuple(q) not in cache}, key=len)
                reused = sum(tuple(q) in cache for q in prompts)
                bar.update(reused)
                if todo:
                    if disabled is not None:
                        with disabled():
                            outs = answer(bare.base, [list(q) for q in todo])
                    else:
                        outs = answer(base, [list(q) for q in todo])
                    cache.update(zip(todo, outs))
                if reused:
                    extra["reused"] = reused
                emit(system, cell, [cache[tuple(q)] for q in prompts], time.perf_counter() - t0, extra)

        # Memory systems, one attached at a time (hooks of two memories on one base would mix).
        for m in run_mems:
            model = _attach(base, m)
            try:
                model.eval()
                for variant, cell in ((v, c) for v in variants for c in cells):
                    bar.set_description(f"{label(m, variant)} {cell.task} {cell.label}")
                    t0 = time.perf_counter()
                    eps_all = cell.episodes
                    # The control reads sample i+1's context before sample i's question.
                    read_eps = eps_all if variant == MEMORY_SYSTEM else eps_all[1:] + eps_all[:1]
                    answers: list[str] = []
                    for i in range(0, len(eps_all), batch_size):
                        state = _read_context(model, read_eps[i:i + batch_size], segment_length, bos, pad)
                        for _ in range(question_reads):
                            state = _read_questions(model, eps_all[i:i + batch_size], segment_length, bos, pad, state)
                        answers += answer(model, [question_prompt(e, bos) for e in eps_all[i:i + batch_size]],
                                          memory_state=state)
                    ctx_tokens = sum(len(e.context) for e in read_eps) / len(read_eps)
                    extra = {"prompt_tokens": round(ctx_tokens + (1 + len(eps_all[0].question)), 1),
                             "segments": max(_segments(len(e.context), segment_length, bos) for e in read_eps)}
                    emit(label(m, variant), cell, answers, time.perf_counter() - t0, extra)
            finally:
                if m.owned and hasattr(model, "detach"):
                    model.detach()
    bar.close()
    return result


# --------------------------------------------------------------------------- reporting


def _lengths_in_order(rows: list[dict[str, Any]]) -> list[str]:
    seen: dict[str, int] = {}
    for r in rows:
        seen.setdefault(r["length"], r.get("length_tokens", parse_length(r["length"])))
    return sorted(seen, key=seen.get)


def _systems_in_order(rows: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(r["system"] for r in rows))


def format_table(result: Mapping[str, Any]) -> str:
    """A compact text table: one line per system and task (plus the mean over tasks), one column per length."""
    rows = result["rows"]
    lengths = _lengths_in_order(rows)
    systems = _systems_in_order(rows)
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    at = {(r["system"], r["task"], r["length"]): r for r in rows}
    sw = max([len("system")] + [len(s) for s in systems])
    head = f"{'system':<{sw}}  {'task':<5}" + "".join(f"{x:>12}" for x in lengths)
    lines = [head, "-" * len(head)]
    for s in systems:
        for t in tasks + ["mean"]:
            cells = []
            for x in lengths:
                if t == "mean":
                    accs = [at[(s, tt, x)]["accuracy"] for tt in tasks if (s, tt, x) in at]
                    accs = [a for a in accs if a is not None]
                    cells.append(f"{sum(accs) / len(accs):>12.2f}" if accs and len(accs) == len(tasks) else f"{'-':>12}")
                    continue
                r = at.get((s, t, x))
                if r is None:
                    cells.append(f"{'':>12}")
                elif r["accuracy"] is None:
                    cells.append(f"{'skipped':>12}")
                else:
                    cells.append(f"{r['accuracy']:>7.2f} ({r['n']:>2})")
            if t == "mean" and len(tasks) == 1:
                continue
            lines.append(f"{s:<{sw}}  {t:<5}" + "".join(cells))
    return "\n".join(lines)


def plot_results(result: Mapping[str, Any], png: str | os.PathLike) -> Path:
    """Accuracy against context length: one line per system and task; the mean over tasks beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    lengths = _lengths_in_order(rows)
    systems = _systems_in_order(rows)
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    at = {(r["system"], r["task"], r["length"]): r["accuracy"] for r in rows}
    styles = ["-", "--", ":", "-."]
    markers = ["o", "s", "^", "D", "v", "P"]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    xs = list(range(len(lengths)))
    fig, (ax, ax_mean) = plt.subplots(1, 2, figsize=(12, 5.5), gridspec_kw={"width_ratios": [3, 2]})
    for si, s in enumerate(systems):
        for ti, t in enumerate(tasks):
            ys = [at.get((s, t, x)) for x in lengths]
            ys = [float("nan") if y is None else y for y in ys]
            ax.plot(xs, ys, linestyle=styles[si % len(styles)], marker=markers[si % len(markers)],
                    color=colors[ti % len(colors)], label=f"{s} {t}", alpha=0.85)
        means = []
        for x in lengths:
            accs = [at.get((s, t, x)) for t in tasks]
            means.append(float("nan") if any(a is None for a in accs) else sum(accs) / len(accs))
        ax_mean.plot(xs, means, linestyle=styles[si % len(styles)], marker=markers[si % len(markers)],
                     color=colors[si % len(colors)], label=s, linewidth=2)
    for a, title in ((ax, "per task"), (ax_mean, "mean over " + ", ".join(tasks))):
        a.set_xticks(xs, lengths)
        a.set_xlabel("context length (tokens)")
        a.set_ylabel("accuracy")
        a.set_ylim(-0.03, 1.03)
        a.grid(alpha=0.3)
        a.set_title(title, fontsize=10)
    ax.legend(fontsize=7, ncol=max(1, len(systems)), loc="upper center", bbox_to_anchor=(0.5, -0.14))
    ax_mean.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    fig.suptitle(f"{result.get('model', '')}  (segment {result.get('segment_length')}, {result.get('device')}, "
                 f"{result.get('dtype')})", fontsize=10)
    fig.tight_layout()
    path = atomic_write(png, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return path


def merge_results(results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One result from several ``evaluate`` runs over the same samples (e.g. systems run side by side).

    The runs must agree on what was asked (tasks' samples: seed, split, segment length, answer
    length, scoring); a cell (system, task, length) may come from one run only. The merged result
    keeps every run's command under ``"commands"``.
    """
    if not results:
        raise ValueError("merge_results: no results given")
    same = ("seed", "split", "segment_length", "max_new_tokens", "scoring", "model")
    first = results[0]
    for r in results[1:]:
        diff = {k: (first.get(k), r.get(k)) for k in same if first.get(k) != r.get(k)}
        if diff:
            raise ValueError(f"merge_results: the runs differ in {diff}; their samples or scoring are not the same")
    merged: dict[str, Any] = {k: v for k, v in first.items() if k not in ("rows", "outputs", "command", "adapters")}
    rows: list[dict[str, Any]] = []
    seen: dict[tuple[str, str, str], int] = {}
    adapters: list[dict[str, Any]] = []
    for i, r in enumerate(results):
        for row in r.get("rows", []):
            key = (row["system"], row["task"], row["length"])
            if key in seen:
                raise ValueError(f"merge_results: cell {key} is in run {seen[key]} and run {i}")
            seen[key] = i
            rows.append(dict(row))
        adapters += r.get("adapters") or ([{"system": s, "adapter": r["adapter"]} for s in r.get("systems", [])
                                           if r.get("adapter") and not s.startswith("base_")])
    samples: dict[str, int] = {}
    for r in results:
        for length, count in (r.get("samples") or {}).items():
            samples[length] = max(samples.get(length, 0), count)
    merged.update(
        systems=list(dict.fromkeys(s for r in results for s in r.get("systems", []))),
        lengths=_lengths_in_order(rows) if rows else first.get("lengths", []),
        samples=samples,
        commands=[r.get("command") for r in results],
        rows=rows,
    )
    merged["adapter"] = adapters[0]["adapter"] if adapters else None
    if adapters:
        merged["adapters"] = adapters
    if any("outputs" in r for r in results):
        merged["outputs"] = [o for r in results for o in r.get("outputs", [])]
    return merged


def save_results(result: Mapping[str, Any], out_dir: str | os.PathLike, name: str, plot: bool = True) -> dict[str, Path]:
    """Write ``<out_dir>/<name>.json`` (and ``.png``) atomically; return the paths written."""
    out = Path(out_dir)
    paths = {"json": atomic_write_text(out / f"{name}.json", json.dumps(result, indent=2) + "\n")}
    if plot and result.get("rows"):
        paths["png"] = plot_results(result, out / f"{name}.png")
    return paths
