"""`backprop estimate-memory`: peak training memory and the longest context per card, from config.json alone."""

from __future__ import annotations

import json

import typer

from backpropagate.cli import app, fail_as_json
from backpropagate.errors import BackpropagateError

_GIB = 2**30


@app.command("estimate-memory")
def estimate_memory_cmd(
    model: str = typer.Option(..., "--model", help="Model folder, config.json, preset or Hugging Face id."),
    max_seq_length: int = typer.Option(..., "--max-seq-length", help="Tokens in one packed row (batch 1)."),
    mode: str = typer.Option("qlora", "--mode", help="lora, qlora or full."),
    lora_r: int = typer.Option(16, "--lora-r", help="Adapter rank (all linear layers targeted)."),
    card_gib: int | None = typer.Option(None, "--card-gib", help="Card size in GiB to fit (offload if needed)."),
    host_gib: float | None = typer.Option(
        None, "--host-gib", help="Host memory in GiB that offloaded activations may take (bounds the longest context)."
    ),
    fp8: bool = typer.Option(False, "--fp8", help="Base weights in FP8 (mode lora; GPUs with FP8 tensor cores)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Predict peak GPU memory of a training step, and the longest context each card size trains."""
    from backpropagate.memory_estimate import estimate_memory

    try:
        estimate = estimate_memory(
            model, max_seq_length, mode=mode, lora_r=lora_r, card_gib=card_gib, host_gib=host_gib, fp8=fp8
        )
    except BackpropagateError as err:
        if as_json:
            fail_as_json(err)
        raise
    if as_json:
        typer.echo(json.dumps({"ok": True, **estimate.to_dict()}))
        return
    offload = "with activation offload" if estimate.offload else "no offload"
    setting = f"{mode} fp8" if fp8 else mode
    typer.echo(f"{model}, {setting}, {max_seq_length} tokens, {offload}: peak {estimate.peak_bytes / _GIB:.1f} GiB")
    for part, size in estimate.parts.items():
        typer.echo(f"  {part:<18} {size / _GIB:8.2f} GiB")
    if estimate.host_bytes:
        n, r = estimate.offloaded_layers, estimate.replayed_layers
        replayed = f"; {r} more replayed in backward" if r else ""
        typer.echo(
            f"  {'host (pinned)':<18} {estimate.host_bytes / _GIB:8.2f} GiB"
            f" (inputs of {n} layer{'s' * (n != 1)}{replayed})"
        )
    typer.echo("longest context: " + ", ".join(f"{g} GiB {t:,}" for g, t in estimate.max_context.items()))
