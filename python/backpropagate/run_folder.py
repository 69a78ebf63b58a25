"""The output folder of a run: chosen, checked and made ready before any work starts.

A run writes checkpoints, metrics, plots and the final adapter under one folder. What a
user already has there is theirs: a folder holding an earlier run's checkpoints or
finished adapter is refused unless `resume` continues that run or `overwrite` says to
replace it, and a path that is a file or cannot be written is refused before the model
is loaded, with a coded error instead of a traceback minutes later.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

from backpropagate.errors import ConfigError, StateError
from backpropagate.export.files import remove_leftovers

RUNS_DIR = Path("runs")
# What a run leaves in its folder; `overwrite` removes exactly these, nothing of the user's.
RUN_OUTPUTS = ("checkpoints", "adapter", "model", "metrics.jsonl", "loss.png", "tensorboard")


def choose(output_dir: str | None, resume: bool) -> Path:
    """The folder named by the user, else the newest run's (resume), else a new `runs/run-<time>`."""
    if output_dir:
        return Path(output_dir).expanduser()
    if resume:
        runs = sorted(RUNS_DIR.glob("run-*/checkpoints"), key=lambda p: p.stat().st_mtime)
        if not runs:
            raise StateError("STATE_CHECKPOINT_NOT_FOUND", f"resume: no run with checkpoints under {RUNS_DIR}/")
        return runs[-1].parent
    return RUNS_DIR / time.strftime("run-%Y%m%d-%H%M%S")


def finished_output(folder: Path) -> Path | None:
    """The final adapter or model folder an earlier run left in `folder`, if any."""
    for name in ("adapter", "model"):
        if (folder / name).is_dir():
            return folder / name
    return None


def prepare(folder: Path, *, resume: bool, overwrite: bool) -> Path:
    """Checks that `folder` can take this run and creates it.

    Raises:
        ConfigError: CONFIG_OUTPUT_DIR_INVALID when the path is a file or cannot be written.
        StateError: STATE_OUTPUT_EXISTS when an earlier run's checkpoints or adapter are
            there and neither `resume` nor `overwrite` was given.
    """
    if folder.exists() and not folder.is_dir():
        raise ConfigError(
            "CONFIG_OUTPUT_DIR_INVALID", f"output_dir={str(folder)!r} is a file; a run needs a folder there"
        )
    # A run killed while saving left hidden temporary outputs (or the adapter it was replacing).
    remove_leftovers(folder, RUN_OUTPUTS)
    has_checkpoints = any((folder / "checkpoints").glob("step-*"))
    finished = finished_output(folder)
    if not resume and not overwrite and (has_checkpoints or finished is not None):
        what = "checkpoints of an earlier run" if has_checkpoints else f"a finished run ({finished})"
        raise StateError(
            "STATE_OUTPUT_EXISTS",
            f"{folder} holds {what}",
            hint="Pass --resume to continue that run, --overwrite to replace it, or choose another --output-dir.",
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as exc:
        raise ConfigError(
            "CONFIG_OUTPUT_DIR_INVALID", f"output_dir={str(folder)!r} cannot be written ({exc.strerror or exc})"
        ) from exc
    if overwrite and not resume:
        for name in RUN_OUTPUTS:
            path = folder / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                os.remove(path)
    return folder
