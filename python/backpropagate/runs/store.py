"""The run history: one SQLite database that every train, export and eval writes a record to.

The database lives at `<cache root>/runs.db` (`BACKPROPAGATE_HOME` moves it). Several
runs write to it at once, so it runs in WAL mode with a busy timeout, and every write is
one short `BEGIN IMMEDIATE` transaction on its own connection. The schema version is
`PRAGMA user_version`; `MIGRATIONS` brings any older database up to date when it opens.

A run that died without saying so (SIGKILL, power loss) still reads `running` in its
record; `RunStore.reap_dead` turns it into `interrupted` when its process is gone or its
heartbeat is stale, and every reader calls it first.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from backpropagate.errors import ConfigError, StateError
from backpropagate.tiny import cache_root

COMMANDS = ("train", "export", "eval", "multi-run")
STATUSES = ("running", "completed", "failed", "interrupted")
# Seconds a writer waits for another writer's lock before giving up (transactions take milliseconds).
BUSY_TIMEOUT_S = 10.0
# A running record whose heartbeat is older than this belongs to a dead (or frozen) process.
STALE_AFTER_S = 120.0

# Migration n (1-based) takes a database from version n-1 to version n.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE runs (
        run_id TEXT PRIMARY KEY,
        command TEXT NOT NULL,
        status TEXT NOT NULL,
        model TEXT,
        config TEXT NOT NULL DEFAULT '{}',
        data TEXT,
        data_hash TEXT,
        output_dir TEXT,
        metrics_path TEXT,
        metrics TEXT NOT NULL DEFAULT '{}',
        outputs TEXT NOT NULL DEFAULT '{}',
        parent_run_id TEXT,
        error_code TEXT,
        error_message TEXT,
        started_at REAL NOT NULL,
        ended_at REAL,
        pid INTEGER,
        host TEXT,
        heartbeat_at REAL
    );
    CREATE INDEX runs_by_start ON runs (started_at);
    CREATE INDEX runs_by_status ON runs (status);
    CREATE INDEX runs_by_parent ON runs (parent_run_id);
    """,
]

JSON_COLUMNS = ("config", "metrics", "outputs")


def default_path() -> Path:
    """`runs.db` under the package cache root."""
    return cache_root() / "runs.db"


@dataclass
class RunRecord:
    """One row of the history, JSON columns decoded."""

    run_id: str
    command: str
    status: str
    started_at: float
    model: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    data: str | None = None
    data_hash: str | None = None
    output_dir: str | None = None
    metrics_path: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, Any] = field(default_factory=dict)
    parent_run_id: str | None = None
    error_code: str | None = None
    error_message: str | None = None
    ended_at: float | None = None
    pid: int | None = None
    host: str | None = None
    heartbeat_at: float | None = None

    @property
    def duration_s(self) -> float | None:
        """Wall time from start to end (None while running)."""
        return None if self.ended_at is None else self.ended_at - self.started_at

    def to_dict(self) -> dict[str, Any]:
        """The record as `--json` prints it."""
        return {**self.__dict__, "duration_s": self.duration_s}


def unavailable(path: Path, exc: BaseException) -> StateError:
    """The coded error of a history that cannot be read or written."""
    return StateError(
        "STATE_RUN_HISTORY_UNAVAILABLE",
        f"{path}: run history cannot be used ({type(exc).__name__}: {exc})",
    )


def process_alive(pid: int) -> bool:
    """Whether process `pid` exists on this machine (a zombie counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc (macOS): signal 0 is all there is
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


class RunStore:
    """Reads and writes the run history at `path` (default: `default_path()`).

    Every method opens its own connection, so a store may be shared by threads
    (the heartbeat thread) and used by many processes at once.

    Raises:
        StateError: STATE_RUN_HISTORY_UNAVAILABLE when the file is not a database, is
            locked for longer than the busy timeout, or was written by a newer version.
    """

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or default_path()
        with self._connect() as conn:
            self._migrate(conn)

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        except (sqlite3.Error, OSError) as exc:
            raise unavailable(self.path, exc) from exc
        try:
            conn.row_factory = sqlite3.Row
            conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            conn.execute("PRAGMA synchronous = NORMAL")  # WAL stays consistent; a crash loses at most the last writes
            yield conn
        except sqlite3.Error as exc:
            raise unavailable(self.path, exc) from exc
        finally:
            conn.close()

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One short write transaction (taken at once, so it never deadlocks on an upgrade)."""
        with self._connect() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def _enter_wal(self, conn: sqlite3.Connection) -> None:
        """Switches the database to WAL, waiting out other processes doing the same.

        SQLite answers a journal-mode change that races another connection with "database
        is locked" at once, without its busy handler, so the wait is done here.
        """
        deadline = time.monotonic() + BUSY_TIMEOUT_S
        while conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            try:
                conn.execute("PRAGMA journal_mode = WAL")
            except sqlite3.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def _migrate(self, conn: sqlite3.Connection) -> None:
        self._enter_wal(conn)
        if conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS):
            return
        conn.execute("BEGIN IMMEDIATE")  # a second process migrating waits here, then finds nothing to do
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > len(MIGRATIONS):
                raise StateError(
                    "STATE_RUN_HISTORY_UNAVAILABLE",
                    f"{self.path}: run history schema version {version} is newer than this backpropagate "
                    f"understands ({len(MIGRATIONS)})",
                    hint="Upgrade backpropagate, or point BACKPROPAGATE_HOME at another folder.",
                )
            for number in range(version + 1, len(MIGRATIONS) + 1):
                for statement in MIGRATIONS[number - 1].split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {number}")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def schema_version(self) -> int:
        """The database's `user_version`."""
        with self._connect() as conn:
            return int(conn.execute("PRAGMA user_version").fetchone()[0])

    def start(
        self,
        run_id: str,
        command: str,
        *,
        model: str | None = None,
        config: dict[str, Any] | None = None,
        data: str | None = None,
        output_dir: str | None = None,
        metrics_path: str | None = None,
        parent_run_id: str | None = None,
    ) -> None:
        """Records `run_id` as running in this process (a resumed run's record is reopened)."""
        now = time.time()
        values = {
            "run_id": run_id,
            "command": command,
            "status": "running",
            "model": model,
            "config": json.dumps(config or {}, default=str),
            "data": data,
            "output_dir": output_dir,
            "metrics_path": metrics_path,
            "parent_run_id": parent_run_id,
            "started_at": now,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "heartbeat_at": now,
        }
        names = ", ".join(values)
        marks = ", ".join("?" for _ in values)
        # A resumed run keeps its first start time and its parent; the rest is this process's.
        reopened = ", ".join(f"{k} = excluded.{k}" for k in values if k not in ("run_id", "started_at"))
        with self._write() as conn:
            conn.execute(
                f"INSERT INTO runs ({names}) VALUES ({marks}) ON CONFLICT (run_id) DO UPDATE SET {reopened}, "
                "parent_run_id = COALESCE(excluded.parent_run_id, runs.parent_run_id), "
                "ended_at = NULL, error_code = NULL, error_message = NULL",
                list(values.values()),
            )

    def update(self, run_id: str, **columns: Any) -> None:
        """Sets columns of `run_id`'s record (dicts for JSON columns are encoded)."""
        if not columns:
            return
        values = [json.dumps(v, default=str) if k in JSON_COLUMNS else v for k, v in columns.items()]
        assignments = ", ".join(f"{k} = ?" for k in columns)
        with self._write() as conn:
            conn.execute(f"UPDATE runs SET {assignments} WHERE run_id = ?", [*values, run_id])

    def heartbeat(self, run_id: str) -> None:
        """Says that `run_id`'s process is still alive; a record taken for dead meanwhile is running again."""
        with self._write() as conn:
            conn.execute(
                "UPDATE runs SET heartbeat_at = ?, status = 'running', ended_at = NULL, error_message = NULL "
                "WHERE run_id = ? AND status IN ('running', 'interrupted')",
                (time.time(), run_id),
            )

    def finish(
        self,
        run_id: str,
        status: str,
        *,
        metrics: dict[str, Any] | None = None,
        outputs: dict[str, Any] | None = None,
        error_code: str | None = None,
        error_message: str | None = None,
    ) -> None:
        """Closes `run_id`'s record with its final status, metrics, outputs or error."""
        now = time.time()
        columns: dict[str, Any] = {"status": status, "ended_at": now, "heartbeat_at": now}
        columns.update({"error_code": error_code, "error_message": error_message})
        if metrics is not None:
            columns["metrics"] = metrics
        if outputs is not None:
            columns["outputs"] = outputs
        self.update(run_id, **columns)

    def reap_dead(self) -> list[str]:
        """Marks running records of dead processes `interrupted`; returns their ids.

        A process on this machine is dead when its pid is gone; any process is taken for
        dead once its heartbeat is older than `STALE_AFTER_S` (a pid reused, another host).
        """
        host, now = socket.gethostname(), time.time()
        with self._connect() as conn:
            rows = conn.execute("SELECT run_id, pid, host, heartbeat_at FROM runs WHERE status = 'running'").fetchall()
        dead = [
            r["run_id"]
            for r in rows
            if (r["heartbeat_at"] or 0) < now - STALE_AFTER_S
            or (r["host"] == host and r["pid"] is not None and not process_alive(r["pid"]))
        ]
        if dead:
            marks = ", ".join("?" for _ in dead)
            with self._write() as conn:
                conn.execute(
                    f"UPDATE runs SET status = 'interrupted', ended_at = heartbeat_at, "
                    f"error_message = 'process ended without closing the record' "
                    f"WHERE status = 'running' AND run_id IN ({marks})",
                    dead,
                )
        return dead

    def get(self, run_id: str) -> RunRecord | None:
        """The record of exactly `run_id`, or None."""
        with self._connect() as conn:
            row = conn.execute("SELECT * FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        return _record(row) if row is not None else None

    def find(self, prefix: str) -> RunRecord:
        """The one record whose id is or starts with `prefix`.

        Raises:
            StateError: STATE_RUN_NOT_FOUND when none matches.
            ConfigError: CONFIG_RUN_ID_AMBIGUOUS (listing the matches) when several do.
        """
        exact = self.get(prefix)
        if exact is not None:
            return exact
        pattern = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        with self._connect() as conn:
            rows = conn.execute(
                "SELECT * FROM runs WHERE run_id LIKE ? ESCAPE '\\' ORDER BY started_at LIMIT 21", (pattern,)
            ).fetchall()
        if not rows or not prefix:
            raise StateError("STATE_RUN_NOT_FOUND", f"no run in the history has an id starting with {prefix!r}")
        if len(rows) > 1:
            listed = ", ".join(f"{r['run_id']} ({r['command']}, {r['status']})" for r in rows[:20])
            raise ConfigError(
                "CONFIG_RUN_ID_AMBIGUOUS",
                f"{prefix!r} matches {len(rows)}{'+' if len(rows) > 20 else ''} runs: {listed}",
            )
        return _record(rows[0])

    def records(
        self, status: str | None = None, command: str | None = None, limit: int | None = None
    ) -> list[RunRecord]:
        """Records, newest first, optionally of one status or command."""
        where, args = [], []
        if status is not None:
            where.append("status = ?")
            args.append(status)
        if command is not None:
            where.append("command = ?")
            args.append(command)
        sql = "SELECT * FROM runs" + (" WHERE " + " AND ".join(where) if where else "")
        sql += " ORDER BY started_at DESC, rowid DESC" + (f" LIMIT {int(limit)}" if limit else "")
        with self._connect() as conn:
            return [_record(r) for r in conn.execute(sql, args).fetchall()]

    def delete(self, run_id: str) -> None:
        """Removes `run_id`'s record (its files stay)."""
        with self._write() as conn:
            conn.execute("DELETE FROM runs WHERE run_id = ?", (run_id,))


def _record(row: sqlite3.Row) -> RunRecord:
    known = {f.name for f in fields(RunRecord)}
    values = {k: v for k, v in dict(row).items() if k in known}  # columns a later migration added stay in the row
    for name in JSON_COLUMNS:
        try:
            values[name] = json.loads(values[name] or "{}")
        except json.JSONDecodeError:
            values[name] = {}
    return RunRecord(**values)
