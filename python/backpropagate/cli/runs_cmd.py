"""`backprop runs`: list, show, compare and remove the runs recorded in the history."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from backpropagate.cli import app
from backpropagate.errors import ConfigError
from backpropagate.runs.store import COMMANDS, STATUSES, RunRecord, RunStore, process_alive

runs_app = typer.Typer(help="List, show, compare and remove recorded runs (train, export, eval).", no_args_is_help=True)
app.add_typer(runs_app, name="runs")

ID_WIDTH = 8  # characters of a run id that the tables show (any unique prefix is accepted)


def history() -> RunStore:
    """The history, with runs whose process died marked `interrupted` first."""
    store = RunStore()
    store.reap_dead()
    return store


def _when(stamp: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(stamp)) if stamp else "-"


def _age(stamp: float | None) -> str:
    return "never" if stamp is None else f"{time.time() - stamp:.0f} s ago"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m{secs:02d}s"


def headline_metric(record: RunRecord) -> str:
    """The one number a list row shows: final loss for train, held-out loss for eval, size for export."""
    m = record.metrics
    for key in ("final_loss", "loss"):
        if isinstance(m.get(key), int | float):
            return f"{key.replace('final_', '')} {m[key]:.4f}"
    if isinstance(m.get("size_bytes"), int):
        return f"{m['size_bytes'] / 1e6:.1f} MB"
    return record.error_code or "-"


def main_output(record: RunRecord) -> str:
    """Where a run's result is: adapter folder, export path or output folder."""
    outputs = record.outputs
    return str(outputs.get("adapter_dir") or outputs.get("path") or record.output_dir or "-")


def print_table(rows: list[list[str]]) -> None:
    """Left-aligned columns, the first row as header."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        typer.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


@runs_app.command("list")
def list_runs(
    status: Annotated[
        str | None, typer.Option("--status", help=f"Only runs in this state: {', '.join(STATUSES)}.")
    ] = None,
    command: Annotated[
        str | None, typer.Option("--command", help=f"Only runs of this command: {', '.join(COMMANDS)}.")
    ] = None,
    limit: Annotated[int, typer.Option("--limit", "-n", help="Newest N runs (0 = all).", min=0)] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="Print the records as a JSON array.")] = False,
) -> None:
    """List recorded runs, newest first."""
    if status is not None and status not in STATUSES:
        raise ConfigError("CONFIG_INVALID_SETTING", f"--status {status!r}: choose one of {', '.join(STATUSES)}")
    if command is not None and command not in COMMANDS:
        raise ConfigError("CONFIG_INVALID_SETTING", f"--command {command!r}: choose one of {', '.join(COMMANDS)}")
    records = history().records(status=status, command=command, limit=limit or None)
    if as_json:
        typer.echo(json.dumps([r.to_dict() for r in records]))
        return
    if not records:
        typer.echo("no runs recorded yet")
        return
    rows = [["ID", "COMMAND", "STATUS", "MODEL", "STARTED", "TIME", "RESULT", "OUTPUT"]]
    for r in records:
        rows.append(
            [
                r.run_id[:ID_WIDTH],
                r.command,
                r.status,
                r.model or "-",
                _when(r.started_at),
                _duration(r.duration_s),
                headline_metric(r),
                main_output(r),
            ]
        )
    print_table(rows)


@runs_app.command("show")
def show_run(
    run_id: Annotated[str, typer.Argument(help="Run id or a unique prefix of it.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the record as one JSON object.")] = False,
) -> None:
    """Show everything recorded about one run: settings, data, metrics, outputs, related runs."""
    store = history()
    record = store.find(run_id)
    children = [r for r in store.records() if r.parent_run_id == record.run_id]
    if as_json:
        typer.echo(json.dumps({**record.to_dict(), "children": [c.run_id for c in children]}))
        return
    lines = [
        ("run", record.run_id),
        ("command", record.command),
        ("status", record.status + (f" ({record.error_code})" if record.error_code else "")),
        ("model", record.model),
        ("data", record.data),
        ("data hash", record.data_hash),
        ("started", _when(record.started_at)),
        ("time", _duration(record.duration_s)),
        ("output dir", record.output_dir),
        ("metrics file", record.metrics_path),
        ("parent", record.parent_run_id),
        ("process", f"pid {record.pid} on {record.host}, heartbeat {_age(record.heartbeat_at)}")
        if record.status == "running"
        else None,
        ("error", record.error_message),
    ]
    for key, value in filter(None, lines):
        if value is not None:
            typer.echo(f"{key:<13}{value}")
    for title, values in (("metrics", record.metrics), ("outputs", record.outputs), ("settings", record.config)):
        if values:
            typer.echo(f"{title}:")
            flat = flatten(values)
            width = max(map(len, flat)) + 2
            for key, value in flat.items():
                typer.echo(f"  {key:<{width}}{_text(value)}")
    for child in children:
        typer.echo(f"related      {child.run_id} ({child.command}, {child.status})")


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings as dotted keys (`data_config.max_seq_length`)."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def _text(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "-" if value is None else str(value)


def comparison(a: RunRecord, b: RunRecord, everything: bool) -> dict[str, dict[str, list[Any]]]:
    """{"settings": {key: [a, b]}, "metrics": {key: [a, b]}}; settings only where they differ unless `everything`."""
    settings_a = {"model": a.model, "data": a.data, "data_hash": a.data_hash, **flatten(a.config)}
    settings_b = {"model": b.model, "data": b.data, "data_hash": b.data_hash, **flatten(b.config)}
    keys = list(dict.fromkeys([*settings_a, *settings_b]))
    settings = {
        k: [settings_a.get(k), settings_b.get(k)] for k in keys if everything or settings_a.get(k) != settings_b.get(k)
    }
    metric_keys = list(dict.fromkeys([*a.metrics, *b.metrics]))
    return {"settings": settings, "metrics": {k: [a.metrics.get(k), b.metrics.get(k)] for k in metric_keys}}


@runs_app.command("diff")
def diff_runs(
    first: Annotated[str, typer.Argument(help="Run id (or unique prefix).")],
    second: Annotated[str, typer.Argument(help="Run id (or unique prefix) to compare with.")],
    everything: Annotated[bool, typer.Option("--all", help="Show every setting, not only those that differ.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the comparison as one JSON object.")] = False,
) -> None:
    """Compare two runs: their settings (those that differ) and final metrics, side by side."""
    store = history()
    a, b = store.find(first), store.find(second)
    table = comparison(a, b, everything)
    if as_json:
        typer.echo(json.dumps({"runs": [a.run_id, b.run_id], **table}, default=str))
        return
    rows = [["", a.run_id[:ID_WIDTH], b.run_id[:ID_WIDTH]]]
    for section in ("settings", "metrics"):
        if table[section]:
            rows.append([f"[{section}]", "", ""])
            rows += [[key, _text(va), _text(vb)] for key, (va, vb) in table[section].items()]
    if not table["settings"]:
        rows.append(["(same settings)", "", ""])
    print_table(rows)


def run_files(record: RunRecord) -> list[Path]:
    """The files a run made: a training run's output folder, an export's output."""
    if record.command in ("train", "multi-run") and record.output_dir:
        return [Path(record.output_dir)]
    path = record.outputs.get("path")
    return [Path(path)] if isinstance(path, str) else []


@runs_app.command("rm")
def remove_run(
    run_id: Annotated[str, typer.Argument(help="Run id (or unique prefix).")],
    files: Annotated[
        bool, typer.Option("--files", help="Also delete the run's files (training output folder, export output).")
    ] = False,
) -> None:
    """Remove a run's record from the history (its files stay unless --files)."""
    store = history()
    record = store.find(run_id)
    if record.status == "running" and record.pid is not None and process_alive(record.pid):
        raise ConfigError(
            "CONFIG_INVALID_SETTING", f"run {record.run_id} is still running (pid {record.pid}); stop it first"
        )
    removed = []
    for path in run_files(record) if files else []:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        else:
            continue
        removed.append(path)
    store.delete(record.run_id)
    typer.echo(f"removed run {record.run_id}" + "".join(f"\nremoved {p}" for p in removed))
