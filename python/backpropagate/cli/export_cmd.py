"""`backprop export`: adapter folder (or model folder) to LoRA, merged weights or GGUF."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from backpropagate.cli import app

QUANT_HELP = (
    "GGUF type or llama.cpp mix: f32, f16, bf16, q8_0, q4_k_m, q5_k_m, q6_k, q4_0, q5_0, q3_k_m, q2_k, "
    "iq4_nl, iq4_xs (default q8_0)."
)


@app.command("export")
def export_command(
    path: Annotated[Path, typer.Argument(help="Adapter folder (adapter_config.json) or full model folder.")],
    fmt: str = typer.Option("gguf", "--format", "-f", help="lora, merged or gguf."),
    quantization: str | None = typer.Option(None, "--quantization", "-q", help=QUANT_HELP),
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Output folder (or .gguf file); default <PATH>-<format>.")
    ] = None,
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output."),
    ollama: bool = typer.Option(False, "--ollama", help="Write a Modelfile and register the GGUF with Ollama."),
    ollama_name: str | None = typer.Option(
        None, "--ollama-name", help="Model name in Ollama (default: the file's stem)."
    ),
    system: str | None = typer.Option(None, "--system", help="System prompt for the Modelfile."),
    push_to_hub: str | None = typer.Option(
        None, "--push-to-hub", help="Then push the export to this Hugging Face Hub repository (user/name)."
    ),
    private: bool = typer.Option(False, "--private", help="With --push-to-hub: create the repository private."),
) -> None:
    """Export a trained adapter as a PEFT adapter, merged bf16 weights, or GGUF for llama.cpp / Ollama."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from backpropagate.export import export

    columns = (TextColumn("writing GGUF"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    # Progress goes to stderr; stdout carries the result lines.
    with Progress(*columns, console=Console(stderr=True), transient=True, disable=fmt != "gguf") as bar:
        task = bar.add_task("gguf", total=None)
        result = export(
            path,
            fmt,  # type: ignore[arg-type]  # validated inside export()
            output=output,
            quantization=quantization,
            force=force,
            ollama=ollama,
            ollama_name=ollama_name,
            system=system,
            progress=lambda done, total: bar.update(task, completed=done, total=total),
        )
    verb = "reused" if result.reused else "wrote"
    typer.echo(f"{verb} {result.path} ({result.size_bytes / 1e6:.1f} MB) in {result.seconds:.1f} s")
    if result.tensor_types:
        typer.echo("tensor types: " + ", ".join(f"{k} x{v}" for k, v in sorted(result.tensor_types.items())))
    typer.echo(f"model card: {result.model_card}")
    if result.ollama is not None:
        typer.echo(f"ollama: {result.ollama.message}; run `ollama run {result.ollama.model}`")
    if push_to_hub is not None:
        from backpropagate.export.hub import push

        pushed = push(result.path, push_to_hub, private=private)
        typer.echo(f"pushed {len(pushed.files)} files to {pushed.url}: {', '.join(pushed.files)}")
