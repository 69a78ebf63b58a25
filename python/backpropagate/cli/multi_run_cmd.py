"""`backprop multi-run`: continual training of one adapter over several runs (SLAO by default).

Its flags are the `TrainConfig` / `DataConfig` fields of `train` (forwarded to every run)
plus the `MultiRunConfig` fields of its own.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import typer

from backpropagate.cli import app, fail_as_json
from backpropagate.cli.options import command_with_options, given_options
from backpropagate.config import TrainConfig
from backpropagate.continual import MultiRunConfig
from backpropagate.data import DataConfig
from backpropagate.errors import BackpropagateError


def multi_run(
    model: str = typer.Option(
        "tiny-llama", "--model", "-m", help="Preset name, local model folder or Hugging Face id."
    ),
    data: list[Path] = typer.Option(  # noqa: B008 (typer's idiom)
        ...,
        "--data",
        "-d",
        help="One file split into --runs chunks, or one file per run (repeat --data, in run order).",
        readable=False,  # the data reader refuses unreadable files with a code (INPUT_FILE_UNREADABLE)
    ),
    steps: int | None = typer.Option(None, "--steps", help="Optimizer steps of each run (default: one epoch)."),
    epochs: float | None = typer.Option(None, "--epochs", help="Passes over each run's data (instead of --steps)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as one JSON object."),
    **options: Any,
) -> None:
    """Train one adapter over several runs (continual learning) and merge them with SLAO."""
    from backpropagate.trainer import Trainer

    own = {f.name for f in dataclasses.fields(MultiRunConfig)}
    multi_options = given_options({k: v for k, v in options.items() if k in own}, MultiRunConfig)
    train_options = given_options({k: v for k, v in options.items() if k not in own}, TrainConfig, DataConfig)
    try:
        result = Trainer(model, **train_options).multi_run(list(data), steps=steps, epochs=epochs, **multi_options)
    except BackpropagateError as err:
        if as_json:
            fail_as_json(err)
        raise
    summary: dict[str, Any] = {
        "output_dir": str(result.output_dir),
        "adapter_dir": str(result.adapter_dir),
        "plan": str(result.plan_file),
        "runs": [
            {k: r.get(k) for k in ("run", "status", "steps", "final_loss", "heldout_losses")} for r in result.runs
        ],
    }
    if as_json:
        typer.echo(json.dumps(summary))
        return
    typer.echo(f"{'adapter_dir':<12} {summary['adapter_dir']}")
    typer.echo(f"{'plan':<12} {summary['plan']}")
    for run in summary["runs"]:
        losses = ", ".join(f"{name} {loss:.4f}" for name, loss in (run["heldout_losses"] or {}).items())
        typer.echo(f"run {run['run']:<8} final loss {run['final_loss']:.4f}; held-out: {losses}")


command_with_options(
    multi_run,
    MultiRunConfig,
    TrainConfig,
    DataConfig,
    aliases={"output_dir": ("--output", "-o")},
    groups={DataConfig: "Data"},
)
app.command("multi-run")(multi_run)
