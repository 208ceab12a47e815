"""The ``gma6`` command. Each subcommand lives in its own module and registers itself on ``app``."""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    help="GMA6: long-term memory for frozen Hugging Face causal LMs (LM2-style, Gemma 3 first).",
    no_args_is_help=True,
    add_completion=False,
)



@app.callback()
def _root() -> None:
    """GMA6: long-term memory for frozen Hugging Face causal LMs (LM2-style, Gemma 3 first)."""


# Subcommand modules; a module that is missing (not written yet) is skipped, not fatal.
for _name in ("demo", "train", "eval", "bench", "read"):
    try:
        importlib.import_module(f"{__name__}.{_name}")
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{_name}":
            raise


def main() -> None:
    app()
