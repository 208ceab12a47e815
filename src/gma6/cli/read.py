"""``gma6 read``, ``gma6 ask``, ``gma6 inspect``, ``gma6 chat``: read once, ask later.

Which memory: ``--adapter DIR`` if given; else the adapter shipped with gma6 when ``--model`` is
not given (the embedded Gemma 3 270M); else (``--model`` without ``--adapter``) a fresh,
untrained memory ``GMA6Config()`` attached after ``torch.manual_seed(0)``, so that ``read`` and
``ask`` build the same one (the snapshot's adapter hash checks it).

Prompts follow gma6's training format (``gma6.data.DEFAULT_TEMPLATE``): the document is read as
``<context>\\n`` + text, and a question is asked as ``BOS`` + ``\\n</context>\\n\\nQuestion: {q}\\nAnswer:``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Optional

import typer

from . import app
from .common import load, pick_device, pick_dtype

FRESH_SEED = 0


def _template_parts() -> tuple[str, str]:
    from ..data import DEFAULT_TEMPLATE

    before, after = DEFAULT_TEMPLATE.split("{context}")
    prefix = before.format(instruction="").lstrip()  # "<context>\n"
    return prefix, after  # after still holds {question}


def document_ids(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a document as ``gma6 read`` reads it (no BOS: every segment gets its own)."""
    prefix, _ = _template_parts()
    return list(tokenizer.encode(prefix + text, add_special_tokens=False))


def question_ids(tokenizer: Any, question: str) -> list[int]:
    """``BOS + "\\n</context>\\n\\nQuestion: {question}\\nAnswer:"``."""
    _, suffix = _template_parts()
    ids = list(tokenizer.encode(suffix.format(question=question.strip()), add_special_tokens=False))
    bos = getattr(tokenizer, "bos_token_id", None)
    return ([bos] if bos is not None else []) + ids


def answer(mm: Any, tokenizer: Any, state: Any, question: str, max_new_tokens: int = 16) -> str:
    """Greedy answer to ``question`` from the memory ``state`` (first non-empty line)."""
    import torch

    from ..evaluation import answer_text

    ids = question_ids(tokenizer, question)
    x = torch.tensor([ids], device=mm.device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    out = mm.generate(x, memory_state=state, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                      top_p=None, top_k=None, temperature=None)
    return answer_text(tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)).strip()


def load_memory(model: Optional[str], adapter: Optional[Path], device: str = "auto", dtype: str = "auto"):
    """``(memory model, tokenizer, model name for snapshot headers, adapter label)`` (see module doc)."""
    import torch

    from ..base import DEFAULT_MODEL_ID, default_adapter
    from ..config import GMA6Config
    from ..model import attach_memory, load_adapter

    if adapter is not None and not (Path(adapter) / "gma6_config.json").exists():
        raise typer.BadParameter(f"{adapter}: not a gma6 adapter folder (no gma6_config.json)", param_hint="--adapter")
    dev = pick_device(device)
    try:
        base, tok = load(model, dev, pick_dtype(dtype, dev))
    except (OSError, ValueError) as e:
        raise typer.BadParameter(f"{model}: {e}", param_hint="--model") from e
    if adapter is not None or model is None:
        path = adapter or default_adapter()
        mm, label = load_adapter(base, path), str(path)
    else:
        torch.manual_seed(FRESH_SEED)
        mm, label = attach_memory(base, GMA6Config()), f"fresh (seed {FRESH_SEED})"
    if model is None:
        name = DEFAULT_MODEL_ID
    else:
        p = Path(model)
        name = str(p.resolve()) if p.exists() else str(model)
    return mm, tok, name, label


def _tok_name(tok: Any) -> str:
    return str(getattr(tok, "name_or_path", "") or type(tok).__name__)


def _open_snapshot(path: Path, mm: Any, name: str):
    from ..snapshot import load_snapshot

    try:
        return load_snapshot(path, mm, model_name=name, with_metadata=True)
    except FileNotFoundError as e:
        raise typer.BadParameter(str(e), param_hint="NOTES") from e
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from e


_ADAPTER = typer.Option(None, help="Memory adapter folder (default: the shipped one; with --model: a fresh memory, seed 0).")
_MODEL = typer.Option(None, help="Base model (default: the embedded Gemma 3 270M).")


@app.command()
def read(
    file: Path = typer.Argument(..., help="Text file to read (any length)."),
    out: Path = typer.Option(..., "--out", help="Snapshot to write (e.g. notes.gma6)."),
    adapter: Optional[Path] = _ADAPTER,
    model: Optional[str] = _MODEL,
    segment_length: int = typer.Option(256, help="Tokens per segment (BOS included)."),
    record: bool = typer.Option(True, help="Store per-segment gates, slot writes and their tokens (for gma6 inspect)."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
    device: str = typer.Option("auto"),
    dtype: str = typer.Option("auto"),
) -> None:
    """Read a text file segment by segment into the memory and save the memory as a snapshot."""
    import torch

    from ..inspection import read_recorded
    from ..snapshot import save_snapshot

    if not file.is_file():
        raise typer.BadParameter(f"{file}: no such file", param_hint="FILE")
    if segment_length < 2:
        raise typer.BadParameter(f"{segment_length}: needs at least 2 tokens", param_hint="--segment-length")
    text = file.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise typer.BadParameter(f"{file}: the file is empty", param_hint="FILE")
    mm, tok, name, label = load_memory(model, adapter, device, dtype)
    typer.echo(f"memory: {label}", err=True)
    ids = document_ids(tok, text)
    x = torch.tensor([ids], device=mm.device)
    t = time.perf_counter()
    if record:
        state, rec = read_recorded(mm, x, segment_length, tok.bos_token_id, tok, progress=progress)
    else:
        state, rec = mm.read(x, segment_length=segment_length, bos_token_id=tok.bos_token_id, progress=progress), None
    seconds = time.perf_counter() - t
    save_snapshot(out, state, mm, tokenizer_name=_tok_name(tok), tokens_read=len(ids), model_name=name, record=rec,
                  extra={"source": file.name, "segment_length": segment_length, "adapter": label})
    typer.echo(f"read {len(ids)} tokens in {state.segments_read} segments of {segment_length} "
               f"({len(ids) / max(seconds, 1e-9):.0f} tokens/s); wrote {out}")


@app.command()
def ask(
    notes: Path = typer.Argument(..., help="Snapshot written by gma6 read."),
    question: str = typer.Argument(..., help="The question."),
    adapter: Optional[Path] = _ADAPTER,
    model: Optional[str] = _MODEL,
    max_new_tokens: int = typer.Option(16, help="Longest answer in tokens."),
    device: str = typer.Option("auto"),
    dtype: str = typer.Option("auto"),
) -> None:
    """Answer a question from a snapshot, without reading the document again."""
    if not notes.is_file():
        raise typer.BadParameter(f"{notes}: no such snapshot", param_hint="NOTES")
    mm, tok, name, _ = load_memory(model, adapter, device, dtype)
    state, _meta = _open_snapshot(notes, mm, name)
    typer.echo(answer(mm, tok, state, question, max_new_tokens))


@app.command("inspect")
def inspect_(
    notes: Path = typer.Argument(..., help="Snapshot written by gma6 read."),
    out_dir: Optional[Path] = typer.Option(None, help="Where the PNGs go (default: NOTES.inspect/ next to it)."),
    plots: bool = typer.Option(True, help="Write PNG plots."),
) -> None:
    """Summarise a snapshot (tokens, segments, slot usage and age, what each slot was written from) and plot it."""
    from ..inspection import plot, summary
    from ..snapshot import read_snapshot

    if not notes.is_file():
        raise typer.BadParameter(f"{notes}: no such snapshot", param_hint="NOTES")
    try:
        state, meta = read_snapshot(notes)
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from e
    for line in summary(state, meta):
        typer.echo(line)
    if plots:
        out_dir = out_dir or notes.with_name(notes.name + ".inspect")
        for p in plot(state, meta, out_dir):
            typer.echo(f"wrote {p}")


@app.command()
def chat(
    memory: Optional[Path] = typer.Option(None, "--memory", help="Start from this snapshot."),
    adapter: Optional[Path] = _ADAPTER,
    model: Optional[str] = _MODEL,
    segment_length: int = typer.Option(256, help="Tokens per segment when a turn is read."),
    max_new_tokens: int = typer.Option(32, help="Longest reply in tokens."),
    device: str = typer.Option("auto"),
    dtype: str = typer.Option("auto"),
) -> None:
    """Talk to the memory: every turn is read into it, the reply comes from the memory and the turn.

    Commands: /save PATH, /reset, /stats, /quit.
    """
    import torch

    from ..snapshot import save_snapshot

    mm, tok, name, label = load_memory(model, adapter, device, dtype)
    tokens = 0
    if memory is not None:
        if not memory.is_file():
            raise typer.BadParameter(f"{memory}: no such snapshot", param_hint="--memory")
        state, meta = _open_snapshot(memory, mm, name)
        tokens = int(meta.get("tokens_read", 0))
    else:
        state = mm.init_state(1)
    interactive = sys.stdin.isatty()
    typer.echo(f"memory: {label}; {tokens} tokens in it. Commands: /save PATH, /reset, /stats, /quit")
    while True:
        if interactive:
            typer.echo("> ", nl=False)
        line = sys.stdin.readline()
        if not line:
            break
        turn = line.strip()
        if not turn:
            continue
        if turn.startswith("/"):
            cmd, _, arg = turn.partition(" ")
            if cmd == "/quit":
                break
            if cmd == "/reset":
                state, tokens = mm.init_state(1), 0
                typer.echo("memory reset")
            elif cmd == "/stats":
                typer.echo(f"tokens read: {tokens}  segments: {state.segments_read}")
                for i, layer in enumerate(mm.config.layers or []):
                    typer.echo(f"  layer {layer:>2}: mean usage {float(state.usage[:, i].float().mean()):.3f}  "
                               f"mean age {float(state.age[:, i].float().mean()):.1f}")
            elif cmd == "/save":
                if not arg.strip():
                    typer.echo("usage: /save PATH")
                    continue
                p = save_snapshot(Path(arg.strip()), state, mm, tokenizer_name=_tok_name(tok), tokens_read=tokens,
                                  model_name=name, extra={"adapter": label, "source": "chat"})
                typer.echo(f"saved {p}")
            else:
                typer.echo(f"unknown command {cmd}; commands: /save PATH, /reset, /stats, /quit")
            continue
        # the first text a memory reads opens the context, as in gma6 read
        ids = list(tok.encode(("" if tokens else _template_parts()[0]) + turn + "\n", add_special_tokens=False))
        if ids:
            state = mm.read(torch.tensor([ids], device=mm.device), segment_length=segment_length,
                            memory_state=state, bos_token_id=tok.bos_token_id)
            tokens += len(ids)
        typer.echo(f"gma6: {answer(mm, tok, state, turn, max_new_tokens)}")
