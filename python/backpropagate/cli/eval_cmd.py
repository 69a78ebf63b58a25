"""`backprop eval`: held-out loss, perplexity and scored answers of a run, adapter or model; a CI gate."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from backpropagate.cli import app, fail_as_json
from backpropagate.cli.runs_cmd import print_table
from backpropagate.errors import BackpropagateError, ConfigError, RunFailedError
from backpropagate.evaluate import DEFAULT_MAX_NEW_TOKENS, EvalReport

ROWS = ("loss", "perplexity", "tokens", "exact_match", "contains", "token_f1")


def regression(report: EvalReport, baseline: EvalReport) -> float:
    """How much worse `report`'s held-out loss is than `baseline`'s, relative (0.1 = 10% higher)."""
    assert report.loss is not None and baseline.loss is not None
    return (report.loss - baseline.loss) / abs(baseline.loss) if baseline.loss else report.loss - baseline.loss


def print_reports(reports: list[EvalReport]) -> None:
    """Metrics as rows, one column per evaluated target; then each target's sample answers."""
    rows = [["", *(r.target for r in reports)]]
    for name in ROWS:
        values = [r.metrics().get(name) for r in reports]
        if any(v is not None for v in values):
            rows.append([name, *("-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v) for v in values)])
    print_table(rows)
    for report in reports:
        for sample in report.samples:
            typer.echo(f"\n[{report.target}] {sample.prompt}\n  -> {sample.answer}")
            if sample.reference is not None:
                typer.echo(f"  reference: {sample.reference}")


@app.command("eval")
def eval_command(
    target: Annotated[
        str, typer.Argument(help="Run id (or unique prefix), adapter folder, model folder or model name.")
    ],
    data: Annotated[
        Path | None, typer.Option("--data", "-d", help="Held-out data (JSONL/JSON/Parquet) for loss and perplexity.")
    ] = None,
    prompts: Annotated[
        Path | None,
        typer.Option("--prompts", "-p", help='JSONL of {"prompt": ...} or {"messages": [...]}, optional "reference".'),
    ] = None,
    vs: Annotated[
        str | None, typer.Option("--vs", help="Another run, adapter or model to evaluate side by side.")
    ] = None,
    gate_against: Annotated[
        str | None,
        typer.Option(
            "--gate-against", help="Fail (RUNTIME_EVAL_REGRESSION) when the held-out loss is worse than this one's."
        ),
    ] = None,
    max_regression: Annotated[
        float,
        typer.Option("--max-regression", help="Relative loss increase --gate-against tolerates (0.05 = 5%).", min=0),
    ] = 0.0,
    max_new_tokens: Annotated[
        int, typer.Option("--max-new-tokens", help="Longest generated answer.", min=1)
    ] = DEFAULT_MAX_NEW_TOKENS,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print the reports as one JSON object.")] = False,
) -> None:
    """Evaluate a run: held-out loss and perplexity, scored sample answers, side by side with another, as a CI gate."""
    from backpropagate.evaluate import data_config_for, evaluate
    from backpropagate.evaluate.target import resolve_target

    try:
        if gate_against is not None and data is None:
            raise ConfigError("CONFIG_INVALID_SETTING", "--gate-against compares held-out losses: give --data too")
        config = data_config_for(resolve_target(target))  # every target is measured on the same tokens
        reports = [evaluate(target, data, prompts, max_new_tokens, device, config)]
        others = list(dict.fromkeys(o for o in (vs, gate_against) if o is not None))
        reports += [evaluate(o, data, prompts, max_new_tokens, device, config) for o in others]
        gate = reports[1 + others.index(gate_against)] if gate_against is not None else None
        worse = regression(reports[0], gate) if gate is not None else None
    except BackpropagateError as err:
        if as_json:
            fail_as_json(err)
        raise
    failure = None
    if gate is not None and worse is not None and worse > max_regression:
        failure = RunFailedError(
            "RUNTIME_EVAL_REGRESSION",
            f"held-out loss {reports[0].loss:.4f} vs {gate.loss:.4f} of {gate.target}: {worse:+.2%}, "
            f"more than the {max_regression:.2%} --max-regression allows",
        )
    if as_json:
        result = {"ok": failure is None, "reports": [r.to_dict() for r in reports], "regression": worse}
        if failure is not None:
            result["error"] = failure.to_dict()
        typer.echo(json.dumps(result))
        if failure is not None:
            raise typer.Exit(failure.exit_status)
        return
    print_reports(reports)
    if failure is not None:
        raise failure
    if gate is not None:
        typer.echo(f"\ngate passed: held-out loss {worse:+.2%} vs {gate.target} (allowed {max_regression:+.2%})")
