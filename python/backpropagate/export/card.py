"""The model card (README.md) written beside every export.

It records what a reader needs to trust and reproduce the model: the run id, the base
model, the method and hyperparameters, the data hash, the final loss and its curve, and
the command that produced it. Whatever the run record does not hold is said to be unknown.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from backpropagate.export.files import copy_atomic

UNKNOWN = "unknown (no run record)"


def _row(key: str, value: Any) -> str:
    return f"| {key} | {value if value not in (None, '') else UNKNOWN} |"


def _source_rows(source: Any) -> list[str]:
    """Where the base weights came from, when not from the base model's own files (a GGUF)."""
    if not isinstance(source, dict) or not source.get("gguf"):
        return []
    return [
        _row(
            "base weights",
            f"dequantized from `{source['gguf']}` ({source.get('quantization')}): they keep its rounding",
        )
    ]


def render_card(
    *, title: str, fmt: str, quantization: str | None, base_model: str, run: dict[str, Any] | None, files: list[str]
) -> str:
    """Markdown text of the card."""
    run = run or {}
    hp = run.get("hyperparameters")
    final = run.get("final_loss")
    lines = [
        f"# {title}",
        "",
        f"Exported by backpropagate as **{fmt}**" + (f" ({quantization})" if quantization else "") + ".",
        "",
        "| field | value |",
        "| --- | --- |",
        _row("run id", run.get("run_id")),
        _row("base model", run.get("base_model") or base_model),
        *_source_rows(run.get("base_model_source")),
        _row("method", run.get("method")),
        _row("mode", run.get("mode")),
        _row("data hash", run.get("data_hash")),
        _row("final loss", f"{final:.4f}" if isinstance(final, (int, float)) else None),
        "",
        "## Hyperparameters",
        "",
    ]
    if isinstance(hp, dict) and hp:
        lines += ["```json", json.dumps(hp, indent=2, sort_keys=True), "```"]
    else:
        lines.append(f"{UNKNOWN.capitalize()}.")
    lines += ["", "## Loss curve", ""]
    losses = run.get("losses")
    if run.get("loss_curve"):
        lines.append(f"![loss curve]({run['loss_curve']})")
    elif isinstance(losses, list) and losses:
        lines.append("| step | loss |")
        lines.append("| --- | --- |")
        lines += [f"| {s} | {v:.4f} |" for s, v in losses]
    else:
        lines.append(f"{UNKNOWN.capitalize()}.")
    lines += ["", "## Reproduce", ""]
    command = run.get("command")
    lines.append(f"```sh\n{command}\n```" if command else f"{UNKNOWN.capitalize()}.")
    lines += ["", "## Files", ""] + [f"- `{f}`" for f in files] + [""]
    return "\n".join(lines)


def copy_loss_curve(run: dict[str, Any] | None, run_dir: Path, dest_dir: Path) -> None:
    """Copies the loss plot named in the run record next to the card."""
    name = (run or {}).get("loss_curve")
    if isinstance(name, str) and (run_dir / name).is_file() and run_dir.resolve() != dest_dir.resolve():
        copy_atomic(run_dir / name, dest_dir / name)
