"""``gma6 bench``: reading throughput and peak memory of the memory against the bare base.

Systems, all in one process over the same random tokens:

``base_segments``
    the bare base over the same segments as the memory (``logits_to_keep=1``, no memory);
``memory``
    ``MemoryModel.read`` segment by segment (the hooks read the memory at the memory layers,
    the write runs once per segment);
``base_full``
    the bare base in one pass over the whole context (``logits_to_keep=1``);
``train_memory`` / ``train_full``
    one training step over ``train_context`` tokens cut into segments, next-token loss on every
    token (or on ``train_positions`` a segment, as ``gma6 train`` scores, its fp32 copies of the
    logits recomputed in backward as there: ``position_loss``):
    the memory's parameters only (backpropagated through the segments), against a full
    fine-tune of every base parameter (AdamW both). The full fine-tune trains the base it is
    given in place, so it runs last.
``train_full_context``
    the same full fine-tune reading the whole context in one pass (full attention, scored at the same positions):
    what one would train instead to use the context beyond a segment, as ``base_full`` is for reading; skipped
    beyond the base's window.
``train_frozen``
    the floor of any adapter whose first layer is layer 0: the frozen base's forward and its
    backward down to the input embeddings, the adapter itself free (one zero scalar added to the
    embeddings, its AdamW step). ``train_full`` over it bounds how much faster and leaner than a
    full fine-tune such an adapter can be.

Timing: each measurement is one whole pass (all segments of a context) and the best of
``repeats`` passes is kept; within a repeat the systems run one after another (rotating
order), so a slow spell of a shared machine hits them alike. On CUDA the device is
synchronised before the clock stops.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` after a reset (weights included).
On CPU the process's peak resident set size (``VmHWM``) during the pass, after resetting it to
the current RSS through ``/proc/self/clear_refs`` (after ``gc`` and ``malloc_trim``): weights,
the Python interpreter and libraries included. ``peak_extra_gib`` is that peak minus the
memory held just before the pass (what the pass itself added). Where ``clear_refs`` is not
writable, RSS is sampled every millisecond instead (``peak_memory_method`` says which).
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as _dt
import gc
import json
import math
import os
import platform
import re
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from .config import GMA6Config
from .integration import text_config
from .model import MemoryModel, attach_memory, cut_segments, split_segments
from .options import GiB, estimate_peak_bytes, set_gradient_checkpointing
from .segment_graph import GraphedCall, ModuleParameters

SYSTEMS = ("base_segments", "memory", "base_full")
TRAIN_SYSTEMS = ("train_memory", "train_frozen", "train_full", "train_full_context")


@dataclass
class BenchConfig:
    """What ``run_bench`` measures.

    Attributes:
        contexts: tokens per sample read in one measurement.
        batches: batch sizes.
        segments: segment lengths (of ``base_segments`` and ``memory``).
        systems: which of ``SYSTEMS`` to run.
        repeats: passes per measurement; the fastest is kept.
        warmup: untimed passes of one segment per system at each batch and segment shape, before
            timing that shape.
        batch_max_context: batches above 1 only for contexts up to this (None: all).
        full_max_context: ``base_full`` only up to this context (None: all).
        max_seconds: skip a pass predicted (from the previous context) to take longer than this.
        train: also compare a memory-only training step with a full fine-tune step.
        train_context, train_segment, train_batch: that step's tokens per sample, segment, batch.
        train_steps: timed training steps.
        train_positions: next-token loss at this many positions a segment (fixed, spread evenly),
            as ``gma6 train --lm-positions`` scores them; None: every position (the 262k-wide
            logits of every token then dominate both steps' time and memory).
        train_checkpointing: both training steps recompute the base's activations in backward
            (gradient checkpointing), the memory-only one as ``gradient_checkpointing=True`` does.
        train_warmup: untimed training steps first (0: the first timed step also allocates AdamW's
            state, which its peak includes either way).
        train_full_master: for a half-precision base, the full fine-tune keeps fp32 master weights
            and runs under autocast in the base's dtype (mixed precision, as a full fine-tune is
            run); False trains the half-precision weights themselves, whose AdamW updates at a
            fine-tuning learning rate mostly round away (1e-5 changes ~10 % of Gemma 3 270M's bf16
            weights). The memory-only step always keeps the frozen base in its own dtype.
        paired: segments timed in pairs (bare base, then memory forward with the state carried,
            order alternating) at ``paired_batch`` and the longest segment length; on a shared machine
            the pairs see the same load, so their ratios are steadier than whole passes (0: skip).
        paired_batch: the batch of the paired segments (None: the largest of ``batches``, the shape
            the targets name).
        seed: of the random tokens.
        memory: the memory attached for ``memory`` and ``train_memory``.
    """

    contexts: list[int] = field(default_factory=lambda: [1024, 2048, 4096, 8192, 16384])
    batches: list[int] = field(default_factory=lambda: [1, 8])
    segments: list[int] = field(default_factory=lambda: [512, 1024])
    systems: list[str] = field(default_factory=lambda: list(SYSTEMS))
    repeats: int = 1
    warmup: int = 1
    batch_max_context: int | None = None
    full_max_context: int | None = None
    max_seconds: float | None = None
    train: bool = True
    train_context: int = 1024
    train_segment: int = 512
    train_batch: int = 1
    train_steps: int = 1
    train_warmup: int = 1
    train_positions: int | None = None
    train_checkpointing: bool = False
    train_full_master: bool = True
    paired: int = 0
    paired_batch: int | None = None
    seed: int = 0
    memory: GMA6Config = field(default_factory=GMA6Config)

    def __post_init__(self) -> None:
        for name in ("contexts", "batches", "segments"):
            values = getattr(self, name)
            if not values or any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in values):
                raise ValueError(f"{name}={values!r}: expected a non-empty list of positive ints")
        bad = [s for s in self.systems if s not in SYSTEMS]
        if bad:
            raise ValueError(f"systems {bad}: expected some of {SYSTEMS}")
        for name in ("repeats", "train_context", "train_segment", "train_batch", "train_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name}={v!r}: expected a positive int")
        if self.train_positions is not None and (isinstance(self.train_positions, bool) or not isinstance(
                self.train_positions, int) or self.train_positions <= 0):
            raise ValueError(f"train_positions={self.train_positions!r}: expected a positive int or None")
        for name in ("warmup", "train_warmup", "paired"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name}={v!r}: expected a non-negative int")
        if self.paired_batch is not None and (isinstance(self.paired_batch, bool) or not isinstance(
                self.paired_batch, int) or self.paired_batch <= 0):
            raise ValueError(f"paired_batch={self.paired_batch!r}: expected a positive int or None")


# ---------------------------------------------------------------------------------- measuring
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _proc_kib(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"^{field_name}:\s+(\d+) kB", f.read(), re.M)
        return int(m.group(1)) if m else None
    except OSError:
        return None


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux >= 4.0: reset VmHWM to the current RSS
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak memory (GiB) of a ``with`` block on ``device`` (see the module's docstring)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.method = "cuda.max_memory_allocated" if device.type == "cuda" else None
        self.peak_gib: float | None = None
        self.extra_gib: float | None = None
        self._sampler: threading.Thread | None = None
        self._stop = threading.Event()
        self._max_kib = 0

    def __enter__(self) -> PeakMemory:
        gc.collect(1)  # young generations only: a full collection takes ~0.3 s with transformers loaded
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._before = torch.cuda.memory_allocated(self.device)
            return self
        _malloc_trim()
        self._before = (_proc_kib("VmRSS") or 0) * 1024
        if _reset_peak_rss() and _proc_kib("VmHWM") is not None:
            self.method = "VmHWM (peak RSS, reset via /proc/self/clear_refs)"
        elif _proc_kib("VmRSS") is not None:
            self.method = "RSS sampled every 1 ms"
            self._max_kib = _proc_kib("VmRSS") or 0
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self._max_kib = max(self._max_kib, _proc_kib("VmRSS") or 0)

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self._sampler is not None:
            self._stop.set()
            self._sampler.join()
            peak = max(self._max_kib, _proc_kib("VmRSS") or 0) * 1024
        elif self.method is not None:
            peak = (_proc_kib("VmHWM") or 0) * 1024
        else:
            return
        self.peak_gib = peak / GiB
        self.extra_gib = max(peak - self._before, 0) / GiB


def _is_oom(e: BaseException) -> bool:
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def _measure(fn: Callable[[], Any], device: torch.device) -> tuple[float, PeakMemory]:
    with PeakMemory(device) as peak:
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        seconds = time.perf_counter() - t0
    return seconds, peak


def _free(device: torch.device) -> None:
    gc.collect(1)
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------- the systems
def _tokens(vocab: int, batch: int, context: int, seed: int, device: torch.device) -> torch.Tensor:
    high = min(vocab, 32000)
    low = min(10, high // 2)
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, high, (batch, context), generator=g).to(device)


def _runner(system: str, mm: MemoryModel, ids: torch.Tensor, segment: int | None,
            base_graph: GraphedCall | None = None) -> Callable[[], Any]:
    """One pass of ``system`` over ``ids``; ``base_graph`` (``_graphed_base``): the bare base's full segments
    replayed from it."""
    base = mm.base  # its memory hooks return at once when no memory call is active

    if system == "memory":
        return lambda: mm.read(ids, segment_length=segment)
    # No system keeps a KV cache: none reads it, and the one-pass base's would grow with the context.
    if system == "base_segments":

        @torch.no_grad()
        def run() -> None:
            # as the memory's read does: cut without a mask (none given), no padding mask where a segment has no
            # padding, the weights' key once
            segments, full = cut_segments(ids, None, segment)
            with base_graph.weights_fixed() if base_graph is not None else contextlib.nullcontext():
                run_segments(segments, full)

        def run_segments(segments: list[tuple[torch.Tensor, torch.Tensor]], fulls: list[bool]) -> None:
            for (seg_ids, seg_mask), full in zip(segments, fulls):
                if base_graph is not None and full and base_graph.usable(seg_ids):
                    base_graph(seg_ids)
                else:
                    base(input_ids=seg_ids, attention_mask=None if full else seg_mask.long(), logits_to_keep=1,
                         use_cache=False)

        return run
    if system == "base_full":

        @torch.no_grad()
        def run_full() -> None:
            base(input_ids=ids, attention_mask=torch.ones_like(ids), logits_to_keep=1, use_cache=False)

        return run_full
    raise ValueError(f"unknown system {system!r}")


def _graphed_base(mm: MemoryModel) -> GraphedCall | None:
    """The bare base's full segment replayed from a CUDA graph, where the memory's segments are
    (``cuda_graph_segments``): the floor a replayed memory is compared with."""
    if not mm.config.cuda_graph_segments:
        return None
    base = mm.base
    return GraphedCall(lambda ids: (base(input_ids=ids, logits_to_keep=1, use_cache=False).logits,),
                       ModuleParameters(base).key)  # keyed as the memory's graph is


def _estimate(system: str, mm: MemoryModel, batch: int, context: int, segment: int | None) -> float:
    if system == "memory":
        return estimate_peak_bytes(mm, batch, segment) / GiB
    if system == "base_segments":
        return estimate_peak_bytes(mm.base, batch, segment) / GiB
    return estimate_peak_bytes(mm.base, batch, context) / GiB


def _row(system: str, context: int, batch: int, segment: int | None, **extra: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "system": system,
        "context": context,
        "batch": batch,
        "segment": segment,
        "tokens_per_s": None,
        "peak_mem_gib": None,
    }
    row.update(extra)
    return row


def _round(v: float | None, digits: int = 4) -> float | None:
    return None if v is None else round(float(v), digits)


# ------------------------------------------------------------------------------------- the run
def run_bench(
    model: nn.Module,
    config: BenchConfig | None = None,
    command: str = "",
    model_name: str = "",
    log: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Measure the systems on ``model`` (a bare causal LM, already on its device); return the results.

    The bench attaches a memory to ``model`` and, if ``config.train``, fine-tunes it in place
    for a step or two at the end: pass a model the bench may own.
    """
    config = config or BenchConfig()
    say = log or (lambda s: None)
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    mm = attach_memory(model, config.memory)
    base_graph = _graphed_base(mm)  # one for the whole bench: a graph is captured once a shape
    vocab = model.get_output_embeddings().weight.shape[0]
    rows: list[dict[str, Any]] = []
    method: str | None = None

    contexts = sorted(set(config.contexts))
    last: dict[tuple, tuple[int, float]] = {}  # (system, batch, segment) -> (context, seconds)
    failed: dict[tuple, str] = {}
    for batch in sorted(set(config.batches)):
        for si, segment in enumerate(sorted(set(config.segments))):
            systems = [s for s in config.systems if s != "base_full" or si == 0]
            # Untimed passes of one segment at this batch and segment shape: the first call at a new
            # shape pays for allocator growth and kernel selection, which is not reading speed.
            warm_ids = _tokens(vocab, batch, segment, config.seed + 1, device)
            for _ in range(config.warmup):
                for system in systems:
                    _runner(system, mm, warm_ids, None if system == "base_full" else segment, base_graph)()
            _sync(device)
            for context in contexts:
                if batch > 1 and config.batch_max_context is not None and context > config.batch_max_context:
                    continue
                ids = _tokens(vocab, batch, context, config.seed, device)
                todo = {}
                for system in systems:
                    seg = None if system == "base_full" else segment
                    key = (system, batch, seg)
                    row = _row(system, context, batch, seg, est_peak_gib=_round(_estimate(system, mm, batch, context, seg)))
                    if system == "base_full" and config.full_max_context is not None and context > config.full_max_context:
                        row["status"] = f"skipped: context > full_max_context={config.full_max_context}"
                    elif key in failed:
                        row["status"] = f"skipped: {failed[key]} at a shorter context"
                    elif config.max_seconds is not None and key in last:
                        c0, t0 = last[key]
                        power = 2 if system == "base_full" else 1
                        predicted = t0 * (context / c0) ** power
                        if predicted > config.max_seconds:
                            row["status"] = f"skipped: predicted {predicted:.0f} s > max_seconds={config.max_seconds:g}"
                    rows.append(row)
                    if "status" not in row:
                        todo[system] = row
                times: dict[str, list[float]] = {s: [] for s in todo}
                for rep in range(config.repeats):
                    order = list(todo)
                    order = order[rep % len(order):] + order[: rep % len(order)] if order else order
                    for system in order:
                        row = todo[system]
                        if "status" in row:
                            continue
                        try:
                            seconds, peak = _measure(_runner(system, mm, ids, row["segment"], base_graph), device)
                        except Exception as e:  # noqa: BLE001 - recorded, the bench goes on
                            if not _is_oom(e):
                                raise
                            _free(device)
                            row["status"] = "oom"
                            failed[(system, batch, row["segment"])] = "oom"
                            say(f"{system:14s} ctx {context:6d} batch {batch} seg {row['segment']}: out of memory")
                            continue
                        method = method or peak.method
                        times[system].append(seconds)
                        row["peak_mem_gib"] = _round(max(row["peak_mem_gib"] or 0, peak.peak_gib or 0)) if peak.peak_gib is not None else None
                        row["peak_extra_gib"] = _round(max(row.get("peak_extra_gib") or 0, peak.extra_gib or 0)) if peak.extra_gib is not None else None
                for system, row in todo.items():
                    if "status" in row:
                        continue
                    best = min(times[system])
                    row.update(status="ok", seconds=_round(best), repeats=len(times[system]))
                    row["tokens_per_s"] = _round(batch * context / best, 2)
                    last[(system, batch, row["segment"])] = (context, best)
                    say(
                        f"{system:14s} ctx {context:6d} batch {batch} seg {str(row['segment']):>5s}: "
                        f"{row['tokens_per_s']:10.1f} tok/s  peak {row['peak_mem_gib']} GiB"
                    )
                del ids
                _free(device)

    paired = _paired(mm, config, vocab, device, say, base_graph) if config.paired else None
    if config.train:
        rows += _train_rows(mm, config, vocab, device, say)
        method = method or "see rows"
    result = {
        "device": device.type,
        "device_name": _device_name(device),
        "dtype": str(dtype).replace("torch.", ""),
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": command,
        "model": model_name or str(getattr(model.config, "_name_or_path", "")) or type(model).__name__,
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "threads": torch.get_num_threads(),
        "peak_memory_method": method,
        "memory_config": {k: v for k, v in asdict(config.memory).items() if k != "extra"},
        "bench_config": {k: v for k, v in asdict(config).items() if k != "memory"},
        "rows": rows,
    }
    result["summary"] = summarize(rows)
    if paired:
        result["summary"]["paired_memory_over_base_segments"] = paired
    return result


def _train_rows(
    mm: MemoryModel, config: BenchConfig, vocab: int, device: torch.device, say: Callable[[str], None]
) -> list[dict[str, Any]]:
    b, ctx, seg = config.train_batch, config.train_context, config.train_segment
    ids = _tokens(vocab, b, ctx, config.seed + 2, device)
    segs = split_segments(ids, torch.ones_like(ids, dtype=torch.bool), seg)
    out_rows = []

    def run(system: str, step: Callable[[], None], est: float | None) -> None:
        row = _row(system, ctx, b, seg, est_peak_gib=_round(est),
                   loss_positions="all" if config.train_positions is None else config.train_positions,
                   gradient_checkpointing=config.train_checkpointing)
        out_rows.append(row)
        try:
            for _ in range(config.train_warmup):
                step()  # untimed; allocates AdamW's state
            best, peak_gib, extra_gib = math.inf, None, None
            for _ in range(config.train_steps):
                seconds, peak = _measure(step, device)
                best = min(best, seconds)
                peak_gib = max(peak_gib or 0, peak.peak_gib or 0) if peak.peak_gib is not None else None
                extra_gib = max(extra_gib or 0, peak.extra_gib or 0) if peak.extra_gib is not None else None
        except Exception as e:  # noqa: BLE001
            if not _is_oom(e):
                raise
            _free(device)
            row["status"] = "oom"
            say(f"{system:14s}: out of memory")
            return
        row.update(
            status="ok", seconds=_round(best), step_s=_round(best), repeats=config.train_steps,
            tokens_per_s=_round(b * ctx / best, 2), peak_mem_gib=_round(peak_gib), peak_extra_gib=_round(extra_gib),
        )
        say(f"{system:14s} ctx {ctx:6d} batch {b} seg {seg:5d}: {best:8.2f} s/step  peak {row['peak_mem_gib']} GiB")

    opt = torch.optim.AdamW(mm.memory_parameters(), lr=1e-4)
    if config.train_checkpointing:
        set_gradient_checkpointing(mm.base, True)
        mm.train()  # checkpointing acts in training mode only

    def loss_of(model: nn.Module, seg_ids: torch.Tensor, seg_mask: torch.Tensor, **kw: Any) -> tuple[torch.Tensor, Any]:
        if config.train_positions is None:
            out = model(input_ids=seg_ids, attention_mask=seg_mask, labels=seg_ids, **kw)
            return out.loss, out
        pos = scored_positions(seg_ids.shape[1], config.train_positions, seg_ids.device)
        out = model(input_ids=seg_ids, attention_mask=seg_mask, logits_to_keep=pos, **kw)
        return position_loss(out.logits, seg_ids[:, pos + 1]), out

    def memory_step() -> None:
        state, loss = mm.init_state(b), 0.0
        for seg_ids, seg_mask in segs:
            seg_loss, out = loss_of(mm, seg_ids, seg_mask, memory_state=state)
            state, loss = out.memory_state, loss + seg_loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    est = estimate_peak_bytes(mm, b, seg, training=True, segments=len(segs)) / GiB
    run("train_memory", memory_step, est)
    del opt
    _free(device)

    if config.train_checkpointing:
        set_gradient_checkpointing(mm.base, False)
    base = mm.detach()
    if config.train_checkpointing:  # for the floor and the full fine-tune alike
        set_gradient_checkpointing(base, True)
        base.train()
    run_frozen_floor(base, segs, loss_of, device, run)
    half = next(base.parameters()).dtype in (torch.bfloat16, torch.float16)
    master = half and config.train_full_master
    compute_dtype = next(base.parameters()).dtype
    if master:
        base.float()  # fp32 master weights; the maths runs in the base's dtype under autocast
    base.requires_grad_(True)
    full_opt = torch.optim.AdamW(base.parameters(), lr=1e-5)

    def full_step() -> None:
        loss = 0.0
        with torch.autocast(device.type, dtype=compute_dtype, enabled=master):
            for seg_ids, seg_mask in segs:
                loss = loss + loss_of(base, seg_ids, seg_mask.long())[0]
        loss.backward()
        full_opt.step()
        full_opt.zero_grad(set_to_none=True)

    run("train_full", full_step, None)
    name = str(compute_dtype).replace("torch.", "")
    out_rows[-1]["weights"] = f"fp32 master, autocast {name}" if master else name

    window = getattr(text_config(base), "max_position_embeddings", None)
    if window is not None and ctx > window:
        out_rows.append(_row("train_full_context", ctx, b, None, status=f"skipped: context beyond the base's window "
                             f"({window} tokens)"))
    else:
        def full_context_step() -> None:
            with torch.autocast(device.type, dtype=compute_dtype, enabled=master):
                loss = context_loss(base, ids, segs, config.train_positions)
            loss.backward()
            full_opt.step()
            full_opt.zero_grad(set_to_none=True)

        run("train_full_context", full_context_step, None)
        out_rows[-1].update(segment=None, weights=out_rows[-2]["weights"])
    del full_opt
    base.requires_grad_(False)
    if config.train_checkpointing:
        set_gradient_checkpointing(base, False)
        base.eval()
    _free(device)
    return out_rows


def scored_positions(tokens: int, count: int, device: torch.device) -> torch.Tensor:
    """Where a segment of ``tokens`` is scored: ``count`` positions spread evenly over those that have a next token."""
    n = tokens - 1
    return torch.linspace(0, n - 1, min(count, n), device=device).round().long().unique()


def context_loss(model: nn.Module, ids: torch.Tensor, segs: list[tuple[torch.Tensor, torch.Tensor]],
                 positions: int | None) -> torch.Tensor:
    """``train_full_context``'s loss: the whole context in one pass, scored where ``_train_rows``' ``loss_of`` scores
    each of its segments (``positions`` a segment, each segment's mean summed; None: every token, the base's own
    loss), so that it differs from ``train_full`` only in reading the context in one window."""
    if positions is None:
        return model(input_ids=ids, labels=ids).loss
    per, start = [], 0
    for seg_ids, _ in segs:
        per.append(scored_positions(seg_ids.shape[1], positions, ids.device) + start)
        start += seg_ids.shape[1]
    logits = model(input_ids=ids, logits_to_keep=torch.cat(per)).logits
    total, i = 0.0, 0
    for pos in per:
        total = total + position_loss(logits[:, i:i + len(pos)], ids[:, pos + 1])
        i += len(pos)
    return total


def position_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of (B, P, V) logits against (B, P) targets, its fp32 copies recomputed in backward, as ``gma6
    train`` scores its segments (``training._segment_terms``): kept, each segment's vocabulary-wide fp32 logits
    stay until the step's backward (2 GiB at 8 x 4k, 32 positions a segment, on the 270M)."""
    def terms(lg: torch.Tensor, tg: torch.Tensor) -> torch.Tensor:
        # as training.context_terms computes it (and as the session 19 GPU runs ran it)
        return F.nll_loss(F.log_softmax(lg.float(), -1).flatten(0, 1), tg.flatten())

    if not torch.is_grad_enabled():
        return terms(logits, targets)
    return torch.utils.checkpoint.checkpoint(terms, logits, targets, use_reentrant=False)


def run_frozen_floor(
    base: nn.Module, segs: list[tuple[torch.Tensor, torch.Tensor]], loss_of: Callable[..., tuple[torch.Tensor, Any]],
    device: torch.device, run: Callable[[str, Callable[[], None], float | None], None],
) -> None:
    """``train_frozen`` (see the module): a zero scalar is the only trainable parameter, added to the
    input embeddings so that the backward runs through every layer, as it must for a memory at layer 0."""
    probe = nn.Parameter(torch.zeros((), device=device))
    flags = [p.requires_grad for p in base.parameters()]
    base.requires_grad_(False)  # the base stays frozen, whatever it was handed over as
    handle = base.get_input_embeddings().register_forward_hook(lambda m, i, out: out + probe.to(out.dtype))
    opt = torch.optim.AdamW([probe], lr=1e-4)

    def frozen_step() -> None:
        loss = 0.0
        for seg_ids, seg_mask in segs:
            loss = loss + loss_of(base, seg_ids, seg_mask.long())[0]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    try:
        run("train_frozen", frozen_step, None)
    finally:
        handle.remove()
        for p, flag in zip(base.parameters(), flags):
            p.requires_grad_(flag)
    _free(device)


def _paired(mm: MemoryModel, config: BenchConfig, vocab: int, device: torch.device, say: Callable[[str], None],
            base_graph: GraphedCall | None = None) -> dict[str, Any]:
    """Throughput ratio memory / bare base from segments timed in alternating pairs (with ``base_graph``, both
    replayed from CUDA graphs, captured before the timed pairs)."""
    seg, n = max(config.segments), config.paired
    batch = config.paired_batch or max(config.batches)
    ids = _tokens(vocab, batch, seg * n, config.seed + 3, device)
    segs = split_segments(ids, torch.ones_like(ids, dtype=torch.bool), seg)
    state = mm.init_state(batch)
    t_base: list[float] = []
    t_mem: list[float] = []

    def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
        _sync(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        return time.perf_counter() - t0, out

    graphed = base_graph
    # as read() runs its segments, the weights' keys of both graphs taken once
    with torch.no_grad(), mm._reading(), graphed.weights_fixed() if graphed is not None else contextlib.nullcontext():
        if graphed is not None:  # capture both graphs before the timed pairs
            graphed(segs[0][0])
            mm._read_step(segs[0][0], segs[0][1], state, full=True)
        # full segments: neither system gets a padding mask (as read() and base_segments run them)
        for k, (s_ids, s_mask) in enumerate(segs):
            run_base = lambda: mm.base(input_ids=s_ids, logits_to_keep=1, use_cache=False)  # noqa: E731
            run_mem = lambda: mm(input_ids=s_ids, memory_state=state, logits_to_keep=1)  # noqa: E731
            if graphed is not None:  # both replayed from CUDA graphs, the memory as read() runs it
                run_base = lambda: graphed(s_ids)  # noqa: E731
                run_mem = lambda: SimpleNamespace(memory_state=mm._read_step(s_ids, s_mask, state, full=True))  # noqa: E731
            for which in ("base", "memory") if k % 2 == 0 else ("memory", "base"):
                if which == "base":
                    t_base.append(timed(run_base)[0])
                else:
                    seconds, out = timed(run_mem)
                    t_mem.append(seconds)
                    state = out.memory_state
    ratios = sorted(b / m for b, m in zip(t_base, t_mem))
    mid = len(ratios) // 2
    median = ratios[mid] if len(ratios) % 2 else (ratios[mid - 1] + ratios[mid]) / 2
    result = {
        "segment": seg,
        "batch": batch,
        "pairs": len(ratios),
        "median": round(median, 4),
        "ratio_of_totals": round(sum(t_base) / sum(t_mem), 4),
        "ratio_of_fastest": round(min(t_base) / min(t_mem), 4),
    }
    say(f"paired segments ({len(ratios)} x {batch} x {seg} tokens): memory / base throughput median {result['median']:.3f}, "
        f"of totals {result['ratio_of_totals']:.3f}")
    return result


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Throughput of ``memory`` over ``base_segments`` at matching (context, batch, segment); training ratios."""
    ok = {(r["system"], r["context"], r["batch"], r["segment"]): r for r in rows if r.get("status") == "ok"}
    pairs = []
    for (system, ctx, batch, seg), r in ok.items():
        if system == "memory" and ("base_segments", ctx, batch, seg) in ok:
            base = ok[("base_segments", ctx, batch, seg)]
            pairs.append({"context": ctx, "batch": batch, "segment": seg, "ratio": round(r["tokens_per_s"] / base["tokens_per_s"], 4)})
    summary: dict[str, Any] = {}
    if pairs:
        ratios = [p["ratio"] for p in pairs]
        summary["memory_over_base_segments"] = {
            "geomean": round(math.exp(sum(map(math.log, ratios)) / len(ratios)), 4),
            "min": min(ratios),
            "max": max(ratios),
            "pairs": pairs,
        }
    ok_train = {r["system"]: r for r in rows if r["system"] in TRAIN_SYSTEMS and r.get("status") == "ok"}
    for a, b in (("train_memory", "train_full"), ("train_frozen", "train_full"), ("train_memory", "train_frozen"),
                 ("train_memory", "train_full_context")):
        if a in ok_train and b in ok_train:
            summary[f"{a}_over_{b}"] = _train_ratios(ok_train[a], ok_train[b])
    return summary


def _train_ratios(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float | None]:
    def ratio(key: str) -> float | None:
        return round(a[key] / b[key], 4) if a.get(key) and b.get(key) else None

    return {"step_time": ratio("seconds"), "peak_mem": ratio("peak_mem_gib"), "peak_extra_mem": ratio("peak_extra_gib")}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M)
        name = m.group(1).strip() if m else name
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} logical CPUs)"


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


# ------------------------------------------------------------------------------------- outputs
def write_results(result: dict[str, Any], out: str | os.PathLike) -> tuple[Path, Path]:
    """Write the JSON to ``out`` and the plot next to it (same name, ``.png``); return both paths."""
    from .io import atomic_write_text

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    png = out.with_suffix(".png")
    plot(result, png)
    return out, png


def plot(result: dict[str, Any], path: str | os.PathLike) -> Path:
    """Tokens/s and peak memory against context, one line per system, segment and batch; training bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r.get("status") == "ok"]
    read_rows = [r for r in rows if r["system"] in SYSTEMS]
    train_rows = [r for r in rows if r["system"] in TRAIN_SYSTEMS]
    fig, axes = plt.subplots(1, 3 if train_rows else 2, figsize=(17 if train_rows else 12, 4.8))
    colors = {"base_segments": "tab:blue", "memory": "tab:red", "base_full": "tab:gray"}
    styles = {512: "-", 1024: "--", None: ":"}
    lines: dict[tuple, list[dict]] = {}
    for r in read_rows:
        lines.setdefault((r["system"], r["segment"], r["batch"]), []).append(r)
    for (system, seg, batch), rs in sorted(lines.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0, kv[0][2])):
        rs.sort(key=lambda r: r["context"])
        x = [r["context"] for r in rs]
        label = f"{system}" + (f" seg {seg}" if seg else "") + f" b{batch}"
        kw = dict(color=colors.get(system), linestyle=styles.get(seg, "-."), marker="o" if batch == 1 else "s", label=label)
        axes[0].plot(x, [r["tokens_per_s"] for r in rs], **kw)
        if all(r["peak_mem_gib"] is not None for r in rs):
            axes[1].plot(x, [r["peak_mem_gib"] for r in rs], **kw)
    for ax, ylabel in ((axes[0], "tokens / s (best of repeats)"), (axes[1], "peak memory (GiB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens per sample)")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ticks = sorted({r["context"] for r in read_rows})
        ax.set_xticks(ticks, [f"{c // 1024}k" if c % 1024 == 0 else str(c) for c in ticks])
    axes[0].legend(fontsize=7)
    ratio = result.get("summary", {}).get("memory_over_base_segments", {}).get("geomean")
    paired = result.get("summary", {}).get("paired_memory_over_base_segments", {}).get("median")
    title = "reading throughput"
    if ratio:
        title += f"\nmemory / base_segments: {ratio:.3f} (geomean of passes)"
    if paired:
        title += f", {paired:.3f} (median of paired segments)"
    axes[0].set_title(title, fontsize=9)
    axes[1].set_title("peak memory (" + ("max allocated" if result.get("device") == "cuda" else "process peak RSS") + ")")
    if train_rows:
        ax = axes[2]
        names = [r["system"] for r in train_rows]
        ax.bar(names, [r["seconds"] for r in train_rows], color=[{"train_memory": "tab:red", "train_frozen": "tab:blue"}.get(n, "tab:gray") for n in names])
        for i, r in enumerate(train_rows):
            ax.text(i, r["seconds"], f"{r['seconds']:.2f} s\n{r['peak_mem_gib']} GiB", ha="center", va="bottom", fontsize=8)
        ax.set_ylabel("seconds per step")
        ax.margins(y=0.2)
        r0 = train_rows[0]
        ax.set_title(f"training step ({r0['context']} tokens, batch {r0['batch']}, seg {r0['segment']})")
    fig.suptitle(f"gma6 bench on {result.get('device_name', result.get('device'))}, {result.get('dtype')}, {result.get('date', '')[:10]}", fontsize=10)
    fig.tight_layout()
    from .io import atomic_write

    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    finally:
        plt.close(fig)


def parse_tokens(text: str | int) -> int:
    """``"16k"`` -> 16384, ``"1024"`` -> 1024."""
    if isinstance(text, int):
        return text
    s = str(text).strip().lower()
    m = re.fullmatch(r"(\d+)\s*(k?)", s)
    if not m:
        raise ValueError(f"{text!r}: expected a token count such as 1024 or 16k")
    return int(m.group(1)) * (1024 if m.group(2) else 1)


def load_model(name: str | None, dtype: str, device: str) -> nn.Module:
    """The base model to bench (``load_base``'s rules; None: the embedded Gemma 3 270M)."""
    from .base import load_base

    model, _ = load_base(name, dtype=dtype, device=device, progress=True)
    return model


def random_model(config_path: str | os.PathLike, dtype: str | torch.dtype, device: str | torch.device) -> nn.Module:
    """A causal LM of the config (JSON) at ``config_path`` with seeded random weights, in eval mode: the same shapes
    and kernels as the trained model, so the same timings, without its weights (none to stage on a lent GPU)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if not Path(config_path).is_file():
        raise FileNotFoundError(f"model config {str(config_path)!r}: no such file")
    config = AutoConfig.from_pretrained(str(config_path))
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype) if isinstance(dtype, str) else dtype)
    return model.eval()
