"""``gma6 bench``: reading throughput and peak memory, memory vs bare base (logic in ``gma6.bench``)."""

from __future__ import annotations

import dataclasses
import shlex
import sys
from pathlib import Path
from typing import Optional

import typer

from . import app
from .common import pick_device


@app.command()
def bench(
    context: list[str] = typer.Option(["1k", "2k", "4k", "8k", "16k"], "--context", "-c", help="Tokens per sample (1024, 16k, ...); repeatable."),
    batch: list[int] = typer.Option([1, 8], "--batch", "-b", help="Batch sizes; repeatable."),
    segment: list[int] = typer.Option([512, 1024], "--segment", "-s", help="Segment lengths; repeatable."),
    system: list[str] = typer.Option(["base_segments", "memory", "base_full"], "--system", help="Systems to run; repeatable."),
    model: Optional[str] = typer.Option(None, help="Base model (checkpoint folder, .gguf or hub id); default: the embedded Gemma 3 270M."),
    shape: Optional[Path] = typer.Option(
        None, help="Bench a model of this config (JSON) with random weights instead: the same shapes, kernels and "
                   "timings as the trained model's (answers aside), nothing to load."),
    device: Optional[str] = typer.Option(None, help="cuda if available, else cpu."),
    dtype: str = typer.Option("float32", help="The base's dtype: float32, bfloat16, float16."),
    repeats: int = typer.Option(1, help="Passes per measurement; the fastest counts."),
    warmup: int = typer.Option(1, help="Untimed one-segment passes per system at each batch and segment shape."),
    batch_max_context: Optional[str] = typer.Option(None, help="Batches above 1 only up to this context."),
    full_max_context: Optional[str] = typer.Option(None, help="base_full only up to this context."),
    max_seconds: Optional[float] = typer.Option(None, help="Skip a pass predicted to take longer than this."),
    train: bool = typer.Option(True, "--train/--no-train", help="Also time a memory-only vs a full fine-tune training step."),
    train_context: str = typer.Option("1k", help="Tokens per sample of the training step."),
    train_segment: int = typer.Option(512, help="Segment length of the training step."),
    train_batch: int = typer.Option(1, help="Batch of the training step."),
    train_warmup: int = typer.Option(1, help="Untimed training steps before the timed ones."),
    train_steps: int = typer.Option(1, help="Timed training steps a system; the fastest is kept."),
    train_checkpointing: bool = typer.Option(
        False, help="Gradient checkpointing in both training steps (memory-only and full fine-tune)."),
    train_full_master: bool = typer.Option(
        True, "--train-full-master/--train-full-half",
        help="A half-precision base's full fine-tune: fp32 master weights under autocast (as one runs it), or "
             "AdamW on the half-precision weights themselves (most fine-tuning updates round away)."),
    train_positions: Optional[int] = typer.Option(
        None, help="Loss at this many positions a segment, as gma6 train scores (default: every token)."),
    paired: int = typer.Option(0, help="Also time this many segments in alternating base/memory pairs (a steadier ratio on a busy machine)."),
    paired_batch: Optional[int] = typer.Option(None, help="Batch of the paired segments (default: the largest --batch; "
                                                           "their segment is the longest --segment)."),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads (default: torch's choice)."),
    seed: int = typer.Option(0, help="Seed of the random tokens."),
    out: Optional[Path] = typer.Option(None, help="JSON output; default results/bench-<device>.json (the plot goes beside it as .png)."),
    adapter: Optional[Path] = typer.Option(
        None, help="Time this adapter's kind of memory (its config; its LoRA left out, which merges into the base "
                   "for reading). Default: a fresh GMA6Config() memory."),
    cuda_graph_read: bool = typer.Option(
        False, "--cuda-graph-read", help="Time the memory with cuda_graph_read=True (each layer's read replayed from a "
                                         "CUDA graph; the warm-up passes capture them)."),
    triton_read: bool = typer.Option(
        False, "--triton-read", help="Time the memory with triton_read=True (each layer's read one Triton kernel)."),
    triton_write: bool = typer.Option(
        False, "--triton-write", help="Time the memory with triton_write=True (the tokens write's scores and new slots "
                                      "in two Triton kernels)."),
    cuda_graph_segments: bool = typer.Option(
        False, "--cuda-graph-segments", help="Replay each full segment from a CUDA graph, the memory's "
                                             "(cuda_graph_segments=True) and the bare base's alike."),
) -> None:
    """Reading throughput (tokens/s) and peak memory: bare base per segment, memory, bare base in one pass."""
    import torch

    from .. import bench as b

    if threads is not None:
        torch.set_num_threads(threads)
    device = str(pick_device(device))
    try:
        config = b.BenchConfig(
            contexts=[b.parse_tokens(c) for c in context],
            batches=list(batch),
            segments=list(segment),
            systems=list(system),
            repeats=repeats,
            warmup=warmup,
            batch_max_context=b.parse_tokens(batch_max_context) if batch_max_context else None,
            full_max_context=b.parse_tokens(full_max_context) if full_max_context else None,
            max_seconds=max_seconds,
            train=train,
            train_context=b.parse_tokens(train_context),
            train_segment=train_segment,
            train_batch=train_batch,
            train_warmup=train_warmup,
            train_steps=train_steps,
            train_positions=train_positions,
            train_checkpointing=train_checkpointing,
            train_full_master=train_full_master,
            paired=paired,
            paired_batch=paired_batch,
            seed=seed,
            memory=dataclasses.replace(_adapter_kind(adapter) if adapter is not None else b.BenchConfig().memory,
                                       cuda_graph_read=cuda_graph_read, triton_read=triton_read,
                                       triton_write=triton_write, cuda_graph_segments=cuda_graph_segments),
        )
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e
    if shape is not None and model is not None:
        raise typer.BadParameter("--shape and --model: pass one (--shape builds a model of random weights)")
    if shape is not None:
        base = b.random_model(shape, dtype, device)
        name = f"random weights, shape of {shape}"
    else:
        base, name = b.load_model(model, dtype, device), model or "gemma-3-270m (embedded)"
    command = shlex.join(["gma6", *sys.argv[1:]]) if sys.argv and sys.argv[0].endswith("gma6") else shlex.join(sys.argv)
    result = b.run_bench(base, config, command=command, model_name=name, log=typer.echo)
    path = out or Path("results") / f"bench-{torch.device(device).type}.json"
    json_path, png_path = b.write_results(result, path)
    ratio = result["summary"].get("memory_over_base_segments", {}).get("geomean")
    if ratio is not None:
        typer.echo(f"memory / base_segments throughput: {ratio:.3f} (geometric mean over {len(result['summary']['memory_over_base_segments']['pairs'])} settings)")
    pr = result["summary"].get("paired_memory_over_base_segments")
    if pr:
        typer.echo(f"paired segments: memory / base throughput median {pr['median']:.3f} over {pr['pairs']} pairs")
    typer.echo(f"wrote {json_path} and {png_path}")


def _adapter_kind(directory: Path):
    """The memory config of a saved adapter, without its LoRA (what the bench times is the memory)."""
    from ..config import GMA6Config

    try:
        cfg = GMA6Config.load(directory)
    except (OSError, ValueError) as e:
        raise typer.BadParameter(f"--adapter {directory}: {e}") from e
    return dataclasses.replace(cfg, lora_rank=0)
