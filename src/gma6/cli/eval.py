"""``gma6 eval``: accuracy of the bare base and of memory adapters on the same BABILong-style samples."""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import List, Optional

import typer

from . import app
from .common import command_line, load, pick_device, pick_dtype, split_list


def _parse_samples(value: str, lengths: list[int]) -> int | dict[int, int]:
    counts = split_list(value, int)
    if not counts or any(c <= 0 for c in counts):
        raise typer.BadParameter(f"--samples {value!r}: expected positive counts")
    if len(counts) == 1:
        return counts[0]
    if len(counts) != len(lengths):
        raise typer.BadParameter(f"--samples {value!r}: give one count, or one per length ({len(lengths)})")
    return dict(zip(lengths, counts))


@app.command("eval")
def eval_command(
    model: Optional[str] = typer.Option(None, help="Base model: folder, .gguf file or hub id (default: embedded Gemma 3 270M)."),
    adapter: Optional[List[Path]] = typer.Option(
        None, "--adapter", help="Memory adapter folder (repeat to compare several on the same samples)."),
    fresh_memory: bool = typer.Option(False, "--fresh-memory", help="Also run an untrained gated memory (a sanity check)."),
    tasks: str = typer.Option("qa1,qa2,qa3,qa4,qa5", help="Tasks, e.g. qa1,qa2."),
    lengths: str = typer.Option("0k,1k,4k", help="Context lengths, e.g. 0k,1k,4k."),
    samples: str = typer.Option("20", help="Samples per cell: one count, or one per length (e.g. 20,20,5)."),
    systems: str = typer.Option("base_full,base_last_segment,memory",
                                help="Systems: base_full, base_last_segment, base_question, memory, memory_other_context "
                                     "(control: each question after another sample's context)."),
    segment_length: int = typer.Option(512, help="Tokens per segment (BOS included)."),
    seed: int = typer.Option(0, help="Base seed of the test samples."),
    device: str = typer.Option("auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1, ..."),
    dtype: str = typer.Option("auto", help="auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16."),
    limit: Optional[int] = typer.Option(None, help="Cap on samples per cell (smoke runs)."),
    batch_size: int = typer.Option(8, help="Prompts per generate call."),
    max_new_tokens: int = typer.Option(8, help="Tokens generated per answer (greedy)."),
    max_full_tokens: int = typer.Option(32768, help="base_full is skipped for prompts longer than this."),
    question_reads: int = typer.Option(0, help="Memory systems write the question into the memory this many times "
                                               "before answering it (a second read hop at inference; 0: off)."),
    first_line: bool = typer.Option(True, "--first-line/--whole-output",
                                    help="Score the output's first line (default) or all of it, as BABILong does."),
    name: Optional[str] = typer.Option(None, help="Results go to OUT_DIR/NAME.json and .png (default: eval-<time>)."),
    out_dir: Path = typer.Option(Path("results"), help="Folder for the results."),
    plot: bool = typer.Option(True, "--plot/--no-plot", help="Write the accuracy plot."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Evaluate the base (whole prompt, last segment) and memory adapters on generated BABILong samples."""
    from ..config import GMA6Config
    from ..data import parse_length
    from ..data.vocab import check_task
    from ..evaluation import SYSTEMS, evaluate, format_table, save_results

    try:
        task_list = [check_task(t) for t in split_list(tasks)]
        length_list = [parse_length(x) for x in split_list(lengths)]
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e
    if not length_list:
        raise typer.BadParameter("--lengths is empty")
    n = _parse_samples(samples, length_list)
    system_list = split_list(systems)
    bad = [s for s in system_list if s not in SYSTEMS]
    if bad:
        raise typer.BadParameter(f"unknown systems {bad}; valid systems are {', '.join(SYSTEMS)}")
    if not task_list:
        raise typer.BadParameter("--tasks is empty")
    for a in adapter or []:
        if not a.is_dir():
            raise typer.BadParameter(f"{a}: no such adapter folder")
        try:
            GMA6Config.load(a)
        except (OSError, ValueError) as e:
            raise typer.BadParameter(f"{a}: not a gma6 adapter folder ({e})") from e
    for flag, v in (("--segment-length", segment_length), ("--batch-size", batch_size), ("--max-new-tokens", max_new_tokens),
                    ("--limit", limit if limit is not None else 1)):
        if v <= 0:
            raise typer.BadParameter(f"{flag}={v}: expected a positive int")
    if question_reads < 0:
        raise typer.BadParameter(f"--question-reads={question_reads}: expected an int >= 0")
    name = name or "eval-" + _dt.datetime.now().strftime("%Y%m%d-%H%M%S")

    dev = pick_device(device)
    base, tok = load(model, dev, pick_dtype(dtype, dev))
    adapters: list = [str(a) for a in adapter or []]
    if fresh_memory:
        adapters.append(GMA6Config())
    if "memory" in system_list and not adapters:
        typer.echo("memory: skipped (no --adapter; add --fresh-memory to run an untrained one)", err=True)
    from ..base import DEFAULT_MODEL_ID

    model_name = model or DEFAULT_MODEL_ID
    command = command_line()

    def partial(row: dict, result: dict) -> None:  # saved after every row: a stopped run keeps what it did
        result.update(model=model_name, command=command)
        save_results(result, out_dir, name, plot=False)

    result = evaluate(base, tok, task_list, length_list, n, segment_length=segment_length, seed=seed,
                      systems=system_list, adapter=adapters or None, max_new_tokens=max_new_tokens,
                      batch_size=batch_size, progress=progress, limit=limit, max_full_tokens=max_full_tokens,
                      first_line=first_line, on_row=partial, question_reads=question_reads)
    result.update(model=model_name, command=command)
    paths = save_results(result, out_dir, name, plot=plot)
    typer.echo(format_table(result))
    for p in paths.values():
        typer.echo(f"wrote {p}")
