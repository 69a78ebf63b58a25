"""`backprop train`: the CLI face of `Trainer`; every option is a `TrainConfig` field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from backpropagate.cli import app, fail_as_json, invocation
from backpropagate.cli.options import command_with_options, given_options
from backpropagate.config import TrainConfig
from backpropagate.data import DataConfig
from backpropagate.errors import BackpropagateError


def _example_data() -> Path:
    from backpropagate.examples import __file__ as examples_init

    return Path(examples_init).parent / "chat.jsonl"


def train(
    model: str = typer.Option(
        "tiny-llama", "--model", "-m", help="Preset name, local model folder or Hugging Face id."
    ),
    data: Path | None = typer.Option(  # noqa: B008 (typer's idiom)
        None,
        "--data",
        "-d",
        help="Training data (JSONL/JSON/Parquet); default: the built-in example chat data.",
        readable=False,  # the data reader refuses unreadable files with a code (INPUT_FILE_UNREADABLE)
    ),
    steps: int | None = typer.Option(None, "--steps", help="Optimizer steps (default: one epoch)."),
    epochs: float | None = typer.Option(None, "--epochs", help="Passes over the data (instead of --steps)."),
    export: str | None = typer.Option(None, "--export", help="Export after training: gguf, merged or lora."),
    quantization: str | None = typer.Option(
        None, "--quantization", "-q", help="Quantization for --export gguf, e.g. q4_k_m."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the result as one JSON object."),
    **options: Any,
) -> None:
    """Fine-tune a model on your data: LoRA, QLoRA, DoRA or full fine-tuning."""
    from backpropagate.train.distributed import launch, launched_world
    from backpropagate.trainer import Trainer

    try:
        given = given_options(options, TrainConfig, DataConfig)
        world = launched_world()
        if options["gpus"] > 1 and world.size == 1:
            launch(options["gpus"], options["device"], invocation())  # rank 0 of the processes reports the run
            return
        trainer = Trainer(model, **given)
        result = trainer.train(data or _example_data(), steps=steps, epochs=epochs)
        if not world.is_main:
            return  # rank 0 exports and reports the run
        # The format is validated inside export().
        exported = trainer.export(export, quantization=quantization) if export else None  # type: ignore[arg-type]
    except BackpropagateError as err:
        if as_json:
            fail_as_json(err)
        raise
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
        summary["export"] = str(exported.path)
    if as_json:
        typer.echo(json.dumps(summary))
        return
    for key, value in summary.items():
        typer.echo(f"{key:<12} {value}")


command_with_options(
    train, TrainConfig, DataConfig, aliases={"output_dir": ("--output", "-o")}, groups={DataConfig: "Data"}
)
app.command()(train)
