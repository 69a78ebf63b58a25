"""`backprop validate FILE`: formats, row counts, bad lines, lengths and traces of a dataset."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated, Any

import typer

from backpropagate.cli import app, fail_as_json, print_error
from backpropagate.cli.options import command_with_options, given_options
from backpropagate.config import TrainConfig, resolve_settings
from backpropagate.data.config import DataConfig, field_help
from backpropagate.data.dataset import dropped_lines_text
from backpropagate.errors import BackpropagateError, from_code

HELP = field_help(TrainConfig)


def validate(
    file: Annotated[
        Path,
        # readable=False: the data reader refuses unreadable files with a code (INPUT_FILE_UNREADABLE).
        typer.Argument(help="Dataset file: JSONL (one object per line), a JSON array, or Parquet.", readable=False),
    ],
    model: str | None = typer.Option(
        None, "--model", "-m", help="Also template and tokenize with this model (built-in name, folder or hub id)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a report."),
    max_seq_length: int | None = typer.Option(None, "--max-seq-length", help=HELP["max_seq_length"]),
    **options: Any,
) -> None:
    """Check a dataset before training, with the settings `train` would use; refuses it as `train` would."""
    from backpropagate.data.validate import validate as build_report

    try:
        given = given_options(options, DataConfig)
        if max_seq_length is not None:
            given["max_seq_length"] = max_seq_length
        # The same resolution as `backprop train --model M`, so the report shows what training will do.
        settings = resolve_settings(model or "", given)
        config = dataclasses.replace(settings.data, cache=False)
        report = build_report(file, model, config)
    except BackpropagateError as err:
        if as_json:
            fail_as_json(err, file=str(file))
        raise
    typer.echo(json.dumps(report, indent=2) if as_json else render(report))
    if report["error"]:
        # The refusal `train` would give for this file: same code, same exit status.
        refused = from_code(report["error"]["code"], report["error"]["message"])
        if not as_json:
            print_error(refused)
        raise typer.Exit(refused.exit_status)


command_with_options(validate, DataConfig, groups={DataConfig: "Data"})
app.command()(validate)


def render(report: dict[str, Any]) -> str:
    """The report as plain text for a terminal."""
    lines = [
        f"{report['file']}: {report['rows_read']} rows read, {report['rows_valid']} valid ({report['kind']})",
        "formats: " + (", ".join(f"{k} {v}" for k, v in sorted(report["formats"].items())) or "none"),
    ]
    tokens = report.get("tokens")
    if tokens:
        lines.append(
            f"model {report['model']}: {tokens['tokens']} tokens in {tokens['samples']} samples, "
            f"{tokens['label_tokens']} carry the loss; {tokens['rows']} packed rows of {tokens['max_seq_length']} "
            f"(fill {tokens['fill']:.0%}); truncated {tokens['truncated']}"
        )
        split = [f"{marker} ({pieces} tokens)" for marker, pieces in tokens["template_markers"] if pieces != 1]
        if split:
            lines.append(f"note: chat template {tokens['chat_template']}: {', '.join(split)} are not single tokens")
        if tokens["system_left_out"]:
            lines.append(
                f"note: chat template {tokens['chat_template']} left out the system message of "
                f"{tokens['system_left_out']} rows: they train without it"
            )
    if tokens or report["dropped"]:
        dropped = ", ".join(f"{k} {v}" for k, v in sorted(report["dropped"].items())) or "none"
        lines.append(f"dropped: {dropped}")
        if report["dropped"]:
            lines.append(f"  first lines: {dropped_lines_text(report, report['file'])}")
    traces = report["traces"]
    if traces["with_tags"]:
        line = (
            f"traces: {traces['with_tags']} samples with <think> tags: {traces['balanced']} balanced, "
            f"{traces['unbalanced']} unbalanced, {traces['empty']} empty"
        )
        band = traces.get("tokens")
        if band and band["samples"]:
            line += f"; kept {band['samples']} with {band['min_tokens']}..{band['max_tokens']} trace tokens"
        lines.append(line)
    lengths = report["lengths"]
    if lengths["count"]:
        unit = lengths["unit"]
        lines.append(
            f"length ({unit} per sample): min {lengths['min']}, median {lengths['p50']}, "
            f"p95 {lengths['p95']}, max {lengths['max']}"
        )
        peak = max(b["count"] for b in lengths["histogram"]) or 1
        for b in lengths["histogram"]:
            bar = "#" * max(1 if b["count"] else 0, round(40 * b["count"] / peak))
            lines.append(f"  {b['from']:>7}-{b['to']:<7} {bar} {b['count']}")
    if report["errors_total"]:
        shown = len(report["errors"])
        lines.append(f"errors ({report['errors_total']}, first {shown}):")
        lines += [f"  {e}" for e in report["errors"]]
    lines.append("ok" if report["ok"] else f"not usable as is: {report['error']['code']} (below)")
    return "\n".join(lines)
