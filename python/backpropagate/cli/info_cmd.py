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
    presets: bool = typer.Option(False, "--presets", help="List model presets and the settings they apply."),
) -> None:
    """Show versions, GPU, installed extras and usable backends."""
    if presets:
        _print_presets(as_json)
        return
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
    if report["cpu_bf16"] is not None:
        units = "bf16 (the CPU has avx512_bf16 or AMX)" if report["cpu_bf16"] else "fp32 (no bf16 units)"
        table.add_row("cpu precision", f"auto = {units}")
    mlx = report["mlx"]
    table.add_row(
        "mlx rail",
        f"mlx {mlx['mlx']}, mlx-lm {mlx['mlx_lm']} on {mlx['device']}: modes {', '.join(mlx['modes'])}; "
        f"methods {', '.join(mlx['methods'])}"
        if mlx["usable"]
        else "not usable (pip install 'backpropagate[mlx]'; mlx-lm[cpu] on Linux)",
    )
    table.add_row("extras", ", ".join(f"{k} {v}" for k, v in report["extras"].items() if v) or "none")
    Console().print(table)


def _print_presets(as_json: bool) -> None:
    from dataclasses import asdict

    from backpropagate.presets import PRESETS

    rows = [asdict(p) for p in PRESETS.values()]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table()
    for column in ("preset", "model", "params", "rank", "alpha", "lr", "context"):
        table.add_column(column, no_wrap=True)
    for p in PRESETS.values():
        size = f"{p.params_b:.1f}B" if p.params_b >= 0.1 else "tiny"
        table.add_row(
            p.name, p.model_id, size, str(p.lora_r), f"{p.lora_alpha:g}", f"{p.learning_rate:g}", str(p.max_seq_length)
        )
    Console().print(table)
