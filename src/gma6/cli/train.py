"""``gma6 train``: train a memory adapter on generated BABILong-style samples."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from . import app
from .common import command_line, load, pick_device, pick_dtype, split_list


@app.command()
def train(
    out: Path = typer.Option(..., "--out", help="Output folder: log.jsonl, loss.png, checkpoint/, adapter/."),
    model: Optional[str] = typer.Option(None, help="Base model: folder, .gguf file or hub id (default: embedded Gemma 3 270M)."),
    memory: str = typer.Option("gated", help="Memory kind: gated (LM2-style) or rmt (memory tokens)."),
    slots: int = typer.Option(16, help="Memory slots (rmt: memory tokens)."),
    memory_dim: int = typer.Option(128, help="Slot width (0: the model's hidden size)."),
    heads: int = typer.Option(4, help="Attention heads of the memory."),
    addressing: str = typer.Option("content", help="Write addressing: content, or content+usage (little-used slots written first)."),
    write_rule: str = typer.Option(
        "slots", help="slots (LM2: slots attend to the segment, gated) or tokens (each segment's top-scoring tokens "
                      "become new slots, the oldest drop out)."),
    tokens_per_segment: int = typer.Option(4, help="New slots a segment with --write-rule tokens."),
    token_retention: str = typer.Option(
        "recent", help="With --write-rule tokens, which slots stay when full: recent, or priority (highest decayed gate)."),
    read_rule: str = typer.Option(
        "memory", help="memory (the memory's own cross-attention) or base (with --write-rule tokens and --memory-dim 0: "
                       "slots hold the base's own hidden states, read through the next layer's attention)."),
    read_site: str = typer.Option(
        "residual", help="With --read-rule base, where the read happens: residual (after the memory layer, through the "
                         "next layer's projections) or attention (inside the next layer's attention, with its own "
                         "queries: nearly free to read)."),
    read_rank: int = typer.Option(
        0, help="With --read-rule base: rank of the memory's own low-rank change of the read's queries, keys and values "
                "(the base's attention stays untouched; 0: none)."),
    read_query: str = typer.Option(
        "before_norm", help="With --read-rank: where the query's change enters, before_norm (before the base's q-norm) or "
                            "after_norm (after it, rotated with the base's queries: the read then takes the base's "
                            "finished queries and rotates only the change), or none (only the slots' keys "
                            "and values are adapted: once a segment, no work at every token)."),
    persistent_slots: int = typer.Option(
        0, help="With --read-rule base: learned slots every read sees before the written ones (a learned prefix; "
                "the base untouched; 0: none)."),
    persistent_reads: str = typer.Option(
        "always", help="When the persistent slots are read: always, or answer (only when the model answers from its "
                       "memory, never while it reads a document)."),
    usage_decay: float = typer.Option(0.9, help="Per-segment decay of a slot's usage (priority retention, base read's recency)."),
    layers: Optional[str] = typer.Option(None, help="Decoder layers with memory, e.g. 3,8,12,17 (default: a spread)."),
    tasks: str = typer.Option("qa1,qa2,qa3,qa4,qa5", help="Tasks to train on, round robin; a task named k times "
                                                           "takes k shares of each batch (e.g. qa1,qa2,qa2)."),
    segment_length: int = typer.Option(256, help="Tokens per segment (BOS included)."),
    curriculum: str = typer.Option("1,2,4,8", help="Context segments per stage."),
    steps_per_stage: int = typer.Option(200, help="Optimizer steps per stage."),
    batch_size: int = typer.Option(16),
    lr: float = typer.Option(1e-3),
    persistent_lr: Optional[float] = typer.Option(
        None, help="Learning rate of the persistent slots and their logit bias (--persistent-slots, or an "
                   "--init-adapter that has them); default: --lr."),
    warmup_steps: int = typer.Option(20),
    bptt: Optional[int] = typer.Option(None, help="Backpropagate through at most this many segments."),
    lora_rank: int = typer.Option(0, help="Co-train LoRA of this rank on the base (needs peft); 0: memory only."),
    lm_weight: float = typer.Option(0.0, help="Weight of the next-token loss on the context (keeps the base intact)."),
    lm_positions: int = typer.Option(16, help="Random context positions a segment scored by that loss."),
    questions_per_context: int = typer.Option(
        1, help="Questions asked about each context read (its own + others its facts answer)."),
    question_reads: int = typer.Option(
        0, help="The memory writes the question (never the answer) this many times before it is answered "
                "(a second read hop; evaluate with gma6 eval --question-reads)."),
    kl_weight: float = typer.Option(0.0, help="Weight of KL(bare || memory) at those positions (0 for a fresh memory)."),
    gradient_checkpointing: bool = typer.Option(False, help="Recompute the base's activations in backward."),
    distill_weight: float = typer.Option(
        0.0, help="Weight of matching, at the question, the hidden states after each memory layer to the bare base's "
                  "with the whole context in its window."),
    select_weight: float = typer.Option(
        0.0, help="With --write-rule tokens: weight of supervising which tokens are written (the story's fact "
                  "sentences, known for generated samples)."),
    text_kl_weight: float = typer.Option(
        0.0, help="Weight of KL(bare || memory) on structured text (the standard library's source: code, markup, "
                  "URLs) read from a fresh memory: keeps the memory harmless on text unlike the stories' prose."),
    text_kl_rows: int = typer.Option(8, help="Rows of structured text a step for that term."),
    text_kl_segments: int = typer.Option(4, help="Segments each such row is read for."),
    in_context: bool = typer.Option(
        False, help="A ceiling, not a memory: train only the base's LoRA (--lora-rank) on the whole context in one "
                    "window, the memory switched off."),
    seed: int = typer.Option(0),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:1, ..."),
    dtype: str = typer.Option("auto", help="Base dtype: auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16."),
    max_steps: Optional[int] = typer.Option(None, help="Stop after this global step (resume later)."),
    time_limit: Optional[float] = typer.Option(None, help="Seconds; then checkpoint and stop (resume later)."),
    resume: bool = typer.Option(True, help="Continue from OUT/checkpoint when it exists."),
    log_every: int = typer.Option(10),
    checkpoint_every: int = typer.Option(100),
    workers: int = typer.Option(-1, help="Processes building batches ahead (-1: 4 on CUDA, 0 on CPU)."),
    init_adapter: Optional[Path] = typer.Option(
        None, help="Start from this saved adapter's weights (memory and its LoRA); its config replaces the memory "
                   "options. E.g. a longer curriculum after a short one. The optimizer starts fresh."),
) -> None:
    """Train only the memory (PEFT-style) with a curriculum over the number of segments."""
    from ..config import GMA6Config
    from ..model import attach_memory
    from ..training import TrainConfig
    from ..training import train as run

    try:
        tcfg = TrainConfig(
            tasks=split_list(tasks), segment_length=segment_length, curriculum=split_list(curriculum, int),
            steps_per_stage=steps_per_stage, batch_size=batch_size, lr=lr, persistent_lr=persistent_lr, warmup_steps=warmup_steps,
            bptt_segments=bptt, seed=seed, log_every=log_every, checkpoint_every=checkpoint_every, lora_rank=lora_rank,
            lm_weight=lm_weight, lm_positions=lm_positions, kl_weight=kl_weight,
            questions_per_context=questions_per_context, question_reads=question_reads, in_context=in_context,
            distill_weight=distill_weight, select_weight=select_weight, text_kl_weight=text_kl_weight,
            text_kl_rows=text_kl_rows, text_kl_segments=text_kl_segments,
        )
        mcfg = GMA6Config(
            memory_type=memory, num_slots=slots, memory_dim=memory_dim or None, num_heads=heads, addressing=addressing,
            write_rule=write_rule, tokens_per_segment=tokens_per_segment, token_retention=token_retention,
            read_rule=read_rule, read_rank=read_rank, read_query=read_query, persistent_slots=persistent_slots,
            persistent_reads=persistent_reads,
            read_site=read_site, usage_decay=usage_decay,
            layers=split_list(layers, int) if layers else None, gradient_checkpointing=gradient_checkpointing,
        )
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e
    if select_weight and init_adapter is None and write_rule != "tokens":
        raise typer.BadParameter("--select-weight supervises the tokens write: it needs --write-rule tokens")
    if time_limit is not None and not time_limit > 0:
        raise typer.BadParameter(f"--time-limit={time_limit}: expected a positive number of seconds")
    if out.exists() and not out.is_dir():
        raise typer.BadParameter(f"{out} exists and is not a folder", param_hint="--out")
    saved = _adapter_config(init_adapter) if init_adapter is not None else None
    if saved is not None:
        if lora_rank not in (0, saved.lora_rank):
            raise typer.BadParameter(f"--lora-rank={lora_rank} but {init_adapter} has lora_rank={saved.lora_rank}: "
                                     "leave --lora-rank out or give the adapter's rank")
        tcfg.lora_rank = saved.lora_rank  # recorded, and checked on resume
    if persistent_lr is not None and not (saved.persistent_slots if saved is not None else persistent_slots):
        raise typer.BadParameter("--persistent-lr needs persistent slots: give --persistent-slots, or an "
                                 "--init-adapter that has them")
    if tcfg.batch_size % int(os.environ.get("WORLD_SIZE", "1") or 1):
        raise typer.BadParameter(f"--batch-size={batch_size} cannot be split evenly over WORLD_SIZE="
                                 f"{os.environ['WORLD_SIZE']} processes")
    from ..distributed import init_from_environment

    # under torchrun / accelerate launch: one process a GPU, each on its rows of every batch
    replicas, replica_device = init_from_environment()
    dev = pick_device(replica_device if replica_device is not None and device == "auto" else device)
    if not replicas.main:
        replicas.barrier()  # the first process loads first: it converts and caches the GGUF once for all
    base, tok = load(model, dev, pick_dtype(dtype, dev))
    if replicas.main:
        replicas.barrier()
    if init_adapter is not None:
        from ..model import load_adapter

        mm = load_adapter(base, init_adapter, gradient_checkpointing=gradient_checkpointing)
    else:
        try:
            mm = attach_memory(base, mcfg)
        except ValueError as e:  # what only the model's dimensions can check (e.g. --read-rule base's width)
            raise typer.BadParameter(str(e)) from e
    if replicas.main:
        mm.print_trainable_parameters()
    last = run(mm, tok, tcfg, out, resume=resume, max_steps=max_steps, command=command_line(),
              num_workers=workers if workers >= 0 else (4 if dev.type == "cuda" else 0), time_limit=time_limit)
    if replicas.world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
        if not replicas.main:
            return
    if "stopped" in last:
        typer.echo(f"stopped by --time-limit at step {last['stopped_at_step']} of {tcfg.total_steps}; "
                   f"run the same command again to resume from {out}/checkpoint")
    typer.echo(f"done: step {last.get('step')} loss {last.get('loss')} acc {last.get('acc')} -> {out}")


def _adapter_config(directory: Path):
    from ..config import GMA6Config

    try:
        return GMA6Config.load(directory)
    except (OSError, ValueError) as e:
        raise typer.BadParameter(f"--init-adapter {directory}: {e}") from e
