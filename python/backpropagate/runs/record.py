"""The hooks that train, export, eval (and multi-run) use to write their run records.

`RunRecording` is a context manager around one command's work: `start` writes a
`running` record and starts a heartbeat thread, `complete` closes it with metrics and
outputs, and leaving the block by an exception closes it as `failed` (with the error's
code) or `interrupted` (Ctrl-C, SIGTERM). The history is a convenience, never a
condition: when the database cannot be used, the run logs one warning and goes on,
writing its own files as usual.

`recorded_train` and `recorded_export` wrap `Trainer.train` and `export` so those stay
readable; the trainer says when its run id is known with `started(...)`.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import json
import threading
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from backpropagate import log
from backpropagate.errors import BackpropagateError, StateError
from backpropagate.runs.store import RunStore

if TYPE_CHECKING:
    from backpropagate.export import ExportResult
    from backpropagate.trainer import Trainer, TrainResult

# Seconds between two heartbeats of a running record.
HEARTBEAT_S = 5.0
STOPPED_CODES = ("RUNTIME_INTERRUPTED", "RUNTIME_TERMINATED")

_active: contextvars.ContextVar[RunRecording | None] = contextvars.ContextVar("run_recording", default=None)
_logger = log.get_logger("runs")
F = TypeVar("F", bound=Callable[..., Any])


def open_history(path: Path | None = None) -> RunStore | None:
    """The run history, or None (after a warning) when it cannot be used; for runs, which go on without it."""
    try:
        return RunStore(path)
    except StateError as err:
        _logger.warning("%s; this run is not recorded in the history (its own files are written as usual)", err)
        return None


class RunRecording:
    """The history record of one command's run (see the module docstring).

    Args:
        command: train, export, eval or multi-run.
        parent_run_id: The run this one continues or examines (multi-run, eval, export).
        store_path: The database (default: the package's `runs.db`).
    """

    def __init__(self, command: str, parent_run_id: str | None = None, store_path: Path | None = None) -> None:
        self.command = command
        self.parent_run_id = parent_run_id
        self.store_path = store_path
        self.run_id: str | None = None
        self._store: RunStore | None = None
        self._closed = False
        self._stop = threading.Event()
        self._beats: threading.Thread | None = None

    def start(self, run_id: str, **fields: Any) -> None:
        """Writes the `running` record (`fields`: model, config, data, output_dir, metrics_path)."""
        self.run_id = run_id
        self._store = open_history(self.store_path)
        self._call("start", run_id, self.command, parent_run_id=self.parent_run_id, **fields)
        if self._store is not None:
            self._beats = threading.Thread(target=self._beat, name="run-heartbeat", daemon=True)
            self._beats.start()

    def note(self, **fields: Any) -> None:
        """Adds what became known during the run (e.g. the data hash)."""
        if self.run_id is not None:
            self._call("update", self.run_id, **fields)

    def complete(self, metrics: dict[str, Any], outputs: dict[str, Any], **fields: Any) -> None:
        """Closes the record as `completed`."""
        self.note(**fields)
        self._close("completed", metrics=metrics, outputs=outputs)

    def _close(self, status: str, **details: Any) -> None:
        self._stop.set()
        if self._beats is not None:
            self._beats.join()
        if self.run_id is not None and not self._closed:
            self._call("finish", self.run_id, status, **details)
        self._closed = True

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            if self.run_id is None or not self._call("heartbeat", self.run_id):
                return

    def _call(self, method: str, *args: Any, **kwargs: Any) -> bool:
        """Calls the store's `method`; on failure warns once and stops recording (the run goes on)."""
        store = self._store
        if store is None:
            return False
        try:
            getattr(store, method)(*args, **kwargs)
        except StateError as err:
            self._store = None
            _logger.warning("%s; the run goes on without its history record", err)
            return False
        return True

    def __enter__(self) -> RunRecording:
        self._token = _active.set(self)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        _active.reset(self._token)
        if exc is None:
            self._close("completed")
        elif isinstance(exc, BackpropagateError):
            status = "interrupted" if exc.code in STOPPED_CODES else "failed"
            self._close(status, error_code=exc.code, error_message=exc.message)
        elif isinstance(exc, Exception):
            self._close("failed", error_message=f"{type(exc).__name__}: {exc}")
        else:  # KeyboardInterrupt, SystemExit
            self._close("interrupted", error_code="RUNTIME_INTERRUPTED", error_message=type(exc).__name__)


def started(run_id: str, **fields: Any) -> None:
    """Tells the recording around the current command that its run `run_id` has started."""
    recording = _active.get()
    if recording is not None:
        recording.start(run_id, **fields)


def train_outcome(result: TrainResult) -> dict[str, Any]:
    """Final metrics, outputs and data hash of a finished training run, for its record."""
    try:
        run_info = json.loads(result.run_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        run_info = {}
    metrics = {
        "final_loss": result.final_loss,
        "final_eval_loss": result.eval_losses[-1][1] if result.eval_losses else None,
        "steps": result.steps,
        "tokens_seen": result.tokens_seen,
        "duration_s": result.duration_s,
    }
    outputs = {
        "adapter_dir": str(result.adapter_dir),
        "checkpoint_dir": str(result.checkpoint_dir) if result.checkpoint_dir else None,
        "loss_curve": str(result.loss_curve) if result.loss_curve else None,
    }
    return {"metrics": metrics, "outputs": outputs, "data_hash": run_info.get("data_hash")}


def recorded_train(train: F) -> F:
    """Records each call of `Trainer.train` (parent: the trainer's `parent_run_id`)."""

    @functools.wraps(train)
    def wrapper(self: Trainer, *args: Any, **kwargs: Any) -> TrainResult:
        with RunRecording("train", parent_run_id=self.parent_run_id) as recording:
            result: TrainResult = train(self, *args, **kwargs)
            recording.complete(**train_outcome(result))
            return result

    return wrapper  # type: ignore[return-value]


def recorded_export(export: F) -> F:
    """Records each call of `export` (parent: the run whose adapter folder is exported)."""
    signature = inspect.signature(export)

    @functools.wraps(export)
    def wrapper(*args: Any, **kwargs: Any) -> ExportResult:
        from backpropagate.log import new_run_id

        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        given = bound.arguments
        source = Path(given["source"]).expanduser()
        run_info = _run_file(source)
        settings = {k: v for k, v in given.items() if k not in ("source", "progress")}
        with RunRecording("export", parent_run_id=run_info.get("run_id")) as recording:
            recording.start(new_run_id(), model=run_info.get("base_model"), config=settings, data=str(source))
            result: ExportResult = export(*args, **kwargs)
            metrics = {"size_bytes": result.size_bytes, "seconds": result.seconds, "quantization": result.quantization}
            outputs = {"path": str(result.path), "files": [str(f) for f in result.files]}
            recording.complete(metrics, outputs)
            return result

    return wrapper  # type: ignore[return-value]


def _run_file(folder: Path) -> dict[str, Any]:
    from backpropagate.export.source import RUN_RECORD

    try:
        info = json.loads((folder / RUN_RECORD).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return info if isinstance(info, dict) else {}
