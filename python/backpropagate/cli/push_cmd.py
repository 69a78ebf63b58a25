"""`backprop push`: an export (or a run's adapter) to the Hugging Face Hub."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from backpropagate.cli import app


@app.command("push")
def push_command(
    path: Annotated[
        Path, typer.Argument(help="Export folder or .gguf file, or a run / adapter folder (exported as LoRA first).")
    ],
    repo: str = typer.Option(..., "--repo", help="Hub repository id, user/name or org/name (created if missing)."),
    private: bool = typer.Option(False, "--private", help="Create the repository private."),
) -> None:
    """Push an adapter, merged weights or GGUF (with its model card) to the Hugging Face Hub."""
    from backpropagate.export.hub import push

    result = push(path, repo, private=private)
    typer.echo(f"pushed {len(result.files)} files to {result.url}: {', '.join(result.files)}")
