"""The Runs page's rows: the run history (`backprop runs`' SQLite store) joined with the UI's runs.

Every training run records itself in the history; the page lists the records whose output
folder is in the workspace's `runs/`, newest first, with the store's status, final loss and
duration. A run the UI started that has no record yet (its worker is still loading the
model) is listed from its folder. When the history cannot be read, the page falls back to
the folders alone and says so.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from backpropagate.errors import StateError
from backpropagate.runs.store import RunStore
from backpropagate.ui.workers import RunManager


def run_rows(runs: RunManager) -> tuple[list[dict[str, Any]], str | None]:
    """The rows of the Runs page, and a note when the history could not be used."""
    runs_dir = runs.workspace.runs_dir().resolve()
    ui_runs = set(runs.names())
    try:
        store = RunStore()
        store.reap_dead()
        records = store.records(command="train")
    except StateError as err:
        rows = [_folder_row(runs, name) for name in sorted(ui_runs)]
        return rows, f"run history unavailable ({err.code}); runs listed from their folders"
    rows, seen = [], set()
    for record in records:
        folder = Path(record.output_dir or "").resolve()
        if folder.parent != runs_dir or folder.name in seen:
            continue  # another workspace's run, or an older record of a run listed already
        seen.add(folder.name)
        loss = record.metrics.get("final_loss")
        rows.append(
            {
                "name": folder.name,
                "openable": folder.name in ui_runs,
                "run_id": record.run_id,
                "state": record.status,
                "model": record.model,
                "data": Path(record.data).name if record.data else None,
                "loss": loss if isinstance(loss, (int, float)) else None,
                "started": time.strftime("%Y-%m-%d %H:%M", time.localtime(record.started_at)),
                "duration_s": round(record.duration_s) if record.duration_s is not None else None,
                "error_code": record.error_code,
            }
        )
    waiting = [_folder_row(runs, name) for name in ui_runs - seen]
    return waiting + rows, None


def _folder_row(runs: RunManager, name: str) -> dict[str, Any]:
    status = runs.status(name)
    return {
        "name": name,
        "openable": True,
        "run_id": status["run_id"],
        "state": "starting" if status["state"] == "running" else status["state"],
        "model": status["model"],
        "data": status["data"],
        "loss": status["loss"],
        "started": "-",
        "duration_s": None,
        "error_code": (status["error"] or {}).get("code"),
    }
