"""The ``dalle-data`` command line: thin typer wrappers over the library functions."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    help="Reproducible DALLE-pytorch training data and lineage-named checkpoints.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def fail(message: str) -> None:
    """Print one clear error line and exit 1 (user or data error, not a bug)."""
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code=1)


def main() -> None:
    app()
