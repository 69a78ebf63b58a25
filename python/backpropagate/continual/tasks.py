"""The data of each run of a multi-run: split, held out, replayed, written as plain JSONL files.

One file is cut into `runs` consecutive chunks (order is kept: a continual-learning stream
is ordered); several files are one run each. From each run's rows a fixed random
`holdout` share is held out, so the loss on every earlier run's data can be measured
after each run. `replay` adds rows drawn from earlier runs' training rows. Every run's
training and held-out rows are written to `OUT/data/` as JSONL, so each run is a normal
training run on a normal data file, and a resumed multi-run reads exactly the same rows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from backpropagate.continual.config import MultiRunConfig
from backpropagate.data.prepare import parquet_as_jsonl, source_bytes
from backpropagate.errors import ConfigError, InputError
from backpropagate.export.files import write_text_atomic


@dataclass
class TaskRows:
    """One run's rows (JSON lines) before they are written."""

    source: str
    train: list[str]
    heldout: list[str]
    replayed: int = 0


def source_lines(path: Path) -> list[str]:
    """The rows of a JSONL, JSON-array or Parquet file, one JSON text each (blank lines skipped)."""
    raw = source_bytes(path)  # refuses a missing or unreachable path with its code
    if raw is None:
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise InputError("INPUT_FILE_UNREADABLE", f"{path}: cannot be read: {exc.strerror or exc}") from exc
    elif path.suffix.lower() == ".parquet":
        raw = parquet_as_jsonl(path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError("INPUT_DATASET_ENCODING_UNSUPPORTED", f"{path}: not UTF-8 ({exc.reason})") from exc
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            return [json.dumps(row, ensure_ascii=False) for row in json.loads(text)]
        except ValueError as exc:
            raise InputError("INPUT_DATASET_PARSE_FAILED", f"{path}: not a JSON array of rows: {exc}") from exc
    return [line for line in text.splitlines() if line.strip()]


def chunks(data: list[Path], config: MultiRunConfig) -> list[tuple[str, list[str]]]:
    """(source, rows) of each run: consecutive chunks of one file, or the files themselves."""
    if len(data) == 1:
        if config.runs is None:
            raise ConfigError(
                "CONFIG_INVALID_SETTING",
                "one --data file needs --runs N to be split into runs (or give one --data file per run)",
            )
        rows = source_lines(data[0])
        per_run = config.samples_per_run or len(rows) // config.runs
        if per_run < 2 or per_run * config.runs > len(rows):
            raise InputError(
                "INPUT_DATASET_TOO_FEW_ROWS",
                f"{data[0]}: {len(rows)} rows cannot give {config.runs} runs of "
                f"{per_run if config.samples_per_run else 'at least 2'} rows",
            )
        return [
            (f"{data[0]}[{i * per_run}:{(i + 1) * per_run}]", rows[i * per_run : (i + 1) * per_run])
            for i in range(config.runs)
        ]
    if config.runs is not None and config.runs != len(data):
        raise ConfigError(
            "CONFIG_INVALID_SETTING",
            f"runs={config.runs} is invalid: expected {len(data)}, one run per --data file (or leave --runs out)",
        )
    out = []
    for path in data:
        rows = source_lines(path)
        wanted = config.samples_per_run or len(rows)
        if wanted < 2 or len(rows) < wanted:
            raise InputError(
                "INPUT_DATASET_TOO_FEW_ROWS",
                f"{path}: {len(rows)} rows; a run needs {max(wanted, 2)} (one held out, the rest to train on)",
            )
        out.append((str(path), rows[:wanted]))
    return out


def split_tasks(data: list[Path], config: MultiRunConfig, seed: int) -> list[TaskRows]:
    """Every run's training rows (with replay) and held-out rows."""
    tasks = []
    for index, (source, rows) in enumerate(chunks(data, config)):
        rng = np.random.default_rng([seed, index, 0x5A0])
        held = min(len(rows) - 1, max(1, round(config.holdout * len(rows))))
        order = rng.permutation(len(rows))
        held_set = set(order[:held].tolist())
        tasks.append(
            TaskRows(
                source=source,
                train=[r for i, r in enumerate(rows) if i not in held_set],
                heldout=[r for i, r in enumerate(rows) if i in held_set],
            )
        )
    for index, task in enumerate(tasks[1:], start=1):
        earlier = [row for t in tasks[:index] for row in t.train[: len(t.train) - t.replayed]]
        count = min(len(earlier), round(config.replay * len(task.train)))
        if count:
            picked = np.random.default_rng([seed, index, 0x2E9]).choice(len(earlier), size=count, replace=False)
            task.train = task.train + [earlier[i] for i in sorted(picked.tolist())]
            task.replayed = count
    return tasks


def write_task(folder: Path, index: int, task: TaskRows) -> tuple[Path, Path]:
    """Writes run `index`'s training and held-out rows; returns their paths."""
    train = folder / f"task-{index:02d}.train.jsonl"
    heldout = folder / f"task-{index:02d}.heldout.jsonl"
    write_text_atomic(train, "".join(row + "\n" for row in task.train))
    write_text_atomic(heldout, "".join(row + "\n" for row in task.heldout))
    return train, heldout
