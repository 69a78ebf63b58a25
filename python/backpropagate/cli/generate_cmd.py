"""`backprop generate`: run a GGUF in llama.cpp and print what it writes."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from backpropagate.cli import app


@app.command("generate")
def generate_command(
    model: Annotated[Path, typer.Argument(help="A .gguf file.")],
    prompt: str = typer.Option(..., "--prompt", "-p", help="The user message (or raw text with --raw)."),
    max_tokens: int = typer.Option(128, "--max-tokens", "-n", min=1, help="Most tokens to generate."),
    raw: bool = typer.Option(False, "--raw", help="Complete the text as is instead of as a chat message."),
    system: str | None = typer.Option(None, "--system", help="System prompt for chat."),
) -> None:
    """Generate text from a GGUF with llama.cpp, using the chat template stored in the file."""
    from backpropagate.generate import generate

    out = generate(model, prompt, max_tokens=max_tokens, chat=not raw, system=system)
    typer.echo(out.text)
