"""`backprop train`: the CLI face of `Trainer`; every option is a `TrainConfig` field."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Optional

import typer

from backpropagate.cli import app
from backpropagate.cli.options import command_with_options, split_options
from backpropagate.config import TrainConfig


def _example_data() -> Path:
    from backpropagate.examples import __file__ as examples_init

    return Path(examples_init).parent / "chat.jsonl"


def train(
    model: str = typer.Option("tiny-llama", "--model", "-m", help="Preset name, local model folder or Hugging Face id."),
    data: Optional[Path] = typer.Option(  # noqa: UP045 (typer needs typing.Optional)
        None, "--data", "-d", help="Training data (JSONL/JSON/Parquet); default: the built-in example chat data."
    ),
    steps: Optional[int] = typer.Option(None, "--steps", help="Optimizer steps (default: one epoch)."),  # noqa: UP045
    epochs: Optional[float] = typer.Option(None, "--epochs", help="Passes over the data (instead of --steps)."),  # noqa: UP045
    export: Optional[str] = typer.Option(  # noqa: UP045
        None, "--export", help="Export after training: gguf, merged or adapter."
    ),
    quantization: Optional[str] = typer.Option(  # noqa: UP045
        None, "--quantization", "-q", help="Quantization for --export gguf, e.g. q4_k_m."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the result as one JSON object."),
    **options: Any,
) -> None:
    """Fine-tune a model on your data: LoRA, QLoRA, DoRA or full fine-tuning."""
    from backpropagate.trainer import Trainer

    given = {k: v for k, v in split_options(options, TrainConfig).items() if v != _default(k)}
    trainer = Trainer(model, **given)
    result = trainer.train(data or _example_data(), steps=steps, epochs=epochs)
    exported = trainer.export(export, quantization=quantization) if export else None
    summary = {
        "run_id": result.run_id,
        "steps": result.steps,
        "final_loss": result.final_loss,
        "tokens_seen": result.tokens_seen,
        "duration_s": round(result.duration_s, 2),
        "adapter_dir": str(result.adapter_dir),
        "loss_curve": str(result.loss_curve) if result.loss_curve else None,
        "metrics": str(result.metrics_path),
        "rows_used": result.data_stats.get("rows_used"),
        "dropped": result.data_stats.get("dropped"),
    }
    if exported is not None:
        summary["export"] = str(getattr(exported, "path", exported))
    if as_json:
        typer.echo(json.dumps(summary))
        return
    for key, value in summary.items():
        typer.echo(f"{key:<12} {value}")


def _default(name: str) -> Any:
    return next(f.default for f in dataclasses.fields(TrainConfig) if f.name == name)


command_with_options(train, TrainConfig, aliases={"output_dir": ("--output", "-o")})
app.command()(train)
