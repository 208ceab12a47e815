"""The ``gma6`` command. Each subcommand lives in its own module and registers itself on ``app``."""

from __future__ import annotations

import typer

app = typer.Typer(
    help="GMA6: long-term memory for frozen Hugging Face causal LMs (LM2-style, Gemma 3 first).",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def _root() -> None:
    """GMA6: long-term memory for frozen Hugging Face causal LMs (LM2-style, Gemma 3 first)."""


# Each subcommand module registers itself on ``app`` when imported.
from . import demo, train  # noqa: E402,F401  (order = order in --help)
from . import eval as _eval  # noqa: E402,F401
from . import bench, read  # noqa: E402,F401


def main() -> None:
    app()
