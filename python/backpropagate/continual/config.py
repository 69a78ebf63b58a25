"""Settings of a multi-run of their own (every training setting is `TrainConfig`'s / `DataConfig`'s).

Each field's help is also its `backprop multi-run` flag's help (`cli/options.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from backpropagate.continual.slao import MERGE_MODES
from backpropagate.errors import ConfigError
from backpropagate.settings import Range, at_least, check_fields, option


@dataclass
class MultiRunConfig:
    """How the data is cut into runs and how the runs are joined into one adapter."""

    runs: int | None = option(
        None,
        "Number of runs: one --data file is split into this many consecutive chunks; with several --data files "
        "(one per run) it may be left out, or must equal their count.",
        group="Multi-run",
        bounds=at_least(1),
    )
    samples_per_run: int | None = option(
        None,
        "Rows each run takes from its data (default: all of a run's file, or an equal share of the one file).",
        group="Multi-run",
        bounds=at_least(2),
    )
    holdout: float = option(
        0.1,
        "Fraction of each run's rows held out (at least one row) to measure, after every run, the loss of the "
        "merged adapter on this and every earlier run's data.",
        group="Multi-run",
        bounds=Range(0, 0.5, low_open=True),
    )
    replay: float = option(
        0.0,
        "Rows from earlier runs' training data added to each later run, as a fraction of its own rows (0 = none).",
        group="Multi-run",
        bounds=Range(0, 1),
    )
    lr_decay: float = option(
        1.0,
        "Learning rate of run i = learning_rate x lr_decay^(i-1).",
        group="Multi-run",
        bounds=Range(0, 1, low_open=True),
    )
    merge_mode: str = option(
        "slao",
        "slao: each run starts from an orthonormal basis of the previous run's LoRA A and its B, and is merged "
        "into one adapter with time-aware weights; simple: plain sequential training of one adapter (baseline).",
        group="Multi-run",
        choices=MERGE_MODES,
    )

    def __post_init__(self) -> None:
        check_fields(self)


def multi_run_config(options: dict[str, Any]) -> MultiRunConfig:
    """A `MultiRunConfig` from keyword options, refusing names it does not know."""
    known = {f.name for f in fields(MultiRunConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(
            "CONFIG_INVALID_SETTING",
            f"unknown multi-run option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}",
        )
    return MultiRunConfig(**options)
