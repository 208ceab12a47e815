"""``gma6 demo``: the main job. A frozen Gemma 3 270M reads long stories through its memory."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from . import app
from .common import load, pick_device, pick_dtype


@app.command()
def demo(
    adapter: Optional[Path] = typer.Option(None, help="Memory adapter folder (default: the one shipped with gma6)."),
    fresh: bool = typer.Option(False, help="Attach an untrained memory instead (outputs equal the bare model's)."),
    model: Optional[str] = typer.Option(None, help="Base model (default: the embedded Gemma 3 270M)."),
    task: str = typer.Option("qa1", help="BABILong task of the stories."),
    length: str = typer.Option("1k", help="Story length in tokens (e.g. 1k, 4k)."),
    samples: int = typer.Option(4, help="How many stories to read."),
    segment_length: int = typer.Option(256, help="Tokens per segment (BOS included)."),
    seed: int = typer.Option(0),
    device: str = typer.Option("auto"),
    dtype: str = typer.Option("auto"),
) -> None:
    """Read generated stories segment by segment, answer questions, and compare with the bare model."""
    import torch

    from ..base import default_adapter
    from ..config import GMA6Config
    from ..choices import rank_choices
    from ..data import answer_choices, generate_samples, parse_length, score
    from ..episodes import encode_episode
    from ..evaluation import answer_text, last_segment_prompt, question_prompt
    from ..model import attach_memory, load_adapter

    try:
        n_tokens = parse_length(length)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e
    if samples <= 0:
        raise typer.BadParameter(f"--samples {samples}: expected a positive number")
    dev = pick_device(device)
    base, tok = load(model, dev, pick_dtype(dtype, dev))
    if fresh:
        mm = attach_memory(base, GMA6Config())
        typer.echo("memory: fresh (untrained)")
    else:
        path = adapter or default_adapter()
        mm = load_adapter(base, path)
        typer.echo(f"memory: {path}")
    mm.print_trainable_parameters()
    bos, pad = tok.bos_token_id, tok.pad_token_id or 0
    stories = generate_samples(task, n_tokens, samples, split="test", seed=seed, tokenizer=tok)

    def answer(ids: list[int], state=None) -> str:
        x = torch.tensor([ids], device=mm.device)
        with torch.no_grad():
            out = mm.generate(x, memory_state=state, max_new_tokens=6, do_sample=False, pad_token_id=pad,
                              top_p=None, top_k=None, temperature=None)
        return answer_text(tok.decode(out[0, len(ids):], skip_special_tokens=True)).strip()

    right = {"bare": 0, "memory": 0}
    picked = {"bare": 0, "memory": 0}
    choices = list(answer_choices(task))
    t_read = tokens = 0.0
    for i, sample in enumerate(stories, 1):
        ep = encode_episode(sample, tok)
        typer.echo(f"\n[{i}/{samples}] {task}, {len(ep.context)} tokens = "
                   f"{-(-len(ep.context) // (segment_length - 1))} segments of {segment_length}")
        typer.echo("  facts hidden in it: " + " ".join(sample.facts[-4:]) + (" ..." if len(sample.facts) > 4 else ""))
        typer.echo(f"  question: {sample.question}   (answer: {sample.target})")
        bare_prompt = last_segment_prompt(ep, segment_length, bos)
        with mm.memory_disabled():
            bare = answer(bare_prompt)
            bare_pick = rank_choices(mm, bare_prompt, choices, tok)
        t = time.perf_counter()
        state = mm.read(torch.tensor([ep.context], device=mm.device), segment_length=segment_length,
                        bos_token_id=bos, progress=True)
        t_read += time.perf_counter() - t
        tokens += len(ep.context)
        mem = answer(question_prompt(ep, bos), state)
        mem_pick = rank_choices(mm, question_prompt(ep, bos), choices, tok, state)
        for name, out, pick in (("bare", bare, bare_pick), ("memory", mem, mem_pick)):
            ok = score(out, sample.target, sample.question, task)
            right[name] += ok
            picked[name] += pick == sample.target
            typer.echo(f"  {name:>6}: says {out!r:<30} {'right' if ok else 'wrong'};  "
                       f"likeliest choice {pick!r} {'right' if pick == sample.target else 'wrong'}")
    with torch.no_grad():
        stats = mm(input_ids=torch.tensor([[bos]], device=mm.device), memory_state=state, return_stats=True).stats
    typer.echo(f"\nread {tokens:.0f} tokens at {tokens / max(t_read, 1e-9):.0f} tokens/s")
    if stats and "input_gate" in stats[0]:
        typer.echo("memory after the last story, per memory layer (decoder layer):")
        for layer, st in zip(mm.config.layers, stats):
            typer.echo(f"  layer {layer:>2}: input gate {float(st['input_gate'].mean()):.2f}  forget gate "
                       f"{float(st['forget_gate'].mean()):.2f}  output gate {float(st['output_gate'].mean()):.2f}  "
                       f"slot usage {float(st['usage'].mean()):.2f}  mean age {float(st['age'].mean()):.1f} segments")
    typer.echo(f"\nover {samples} stories (bare model: last segment + question; memory: read all, then the question):")
    typer.echo(f"  free answer, BABILong scorer:  bare {right['bare']}/{samples}   memory {right['memory']}/{samples}")
    typer.echo(f"  likeliest of {len(choices)} choices:        bare {picked['bare']}/{samples}   memory {picked['memory']}/{samples}"
               f"   (chance {samples / len(choices):.1f})")
