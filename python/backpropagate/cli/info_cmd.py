"""`backprop info`: the environment report and the error-code catalog."""

from __future__ import annotations

import json

import typer

from backpropagate.cli import app
from backpropagate.errors import CATALOG, FAMILY_EXIT


@app.command()
def info(
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
    error_codes: bool = typer.Option(False, "--error-codes", help="Print the catalog of error codes."),
) -> None:
    """Show versions, GPU, installed extras and usable backends."""
    if error_codes:
        rows = [
            {
                "code": code,
                "exit_status": FAMILY_EXIT[code.split("_", 1)[0]],
                "retryable": entry.retryable,
                "hint": entry.hint,
            }
            for code, entry in CATALOG.items()
        ]
        if as_json:
            typer.echo(json.dumps(rows, indent=2))
        else:
            for row in rows:
                retry = " retryable" if row["retryable"] else ""
                typer.echo(f"{row['code']:<36} exit {row['exit_status']}{retry}  {row['hint']}")
        return
    from backpropagate.info import collect

    report = collect()
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(show_header=False, box=None)
    for key in ("backpropagate", "core", "python", "os", "machine", "torch", "cuda_version"):
        table.add_row(key, str(report[key]))
    gpus = ", ".join(f"{g['name']} ({g['vram_gib']} GiB)" for g in report["gpus"]) or "none"
    table.add_row("gpus", gpus)
    table.add_row("backends", ", ".join(k for k, ok in report["backends"].items() if ok) or "none")
    table.add_row("extras", ", ".join(f"{k} {v}" for k, v in report["extras"].items() if v) or "none")
    Console().print(table)
