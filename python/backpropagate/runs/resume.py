"""`resume_run`: continuing a recorded training run, found by its id in the history."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

from backpropagate.errors import ConfigError, StateError
from backpropagate.runs.store import RunStore

if TYPE_CHECKING:
    from backpropagate.config import TrainConfig


def resume_settings(config: TrainConfig) -> TrainConfig:
    """`config` set to resume the run `config.resume_run` names, in that run's output folder.

    Raises:
        StateError: STATE_RUN_NOT_FOUND for an unknown id, STATE_RUN_OUTPUT_MISSING when the
            run's output folder is gone, STATE_RUN_HISTORY_UNAVAILABLE when the history is.
        ConfigError: CONFIG_RUN_ID_AMBIGUOUS for a prefix of several ids; CONFIG_INVALID_SETTING
            for a run that is not a training run, or an output_dir that names another folder.
    """
    assert config.resume_run is not None
    store = RunStore()
    store.reap_dead()
    record = store.find(config.resume_run)
    if record.command != "train":
        raise ConfigError(
            "CONFIG_INVALID_SETTING", f"resume_run={config.resume_run!r}: run {record.run_id} is a {record.command} run"
        )
    if not record.output_dir or not Path(record.output_dir).is_dir():
        raise StateError(
            "STATE_RUN_OUTPUT_MISSING", f"run {record.run_id}: its output folder {record.output_dir} is gone"
        )
    folder = Path(record.output_dir)
    if config.output_dir is not None and Path(config.output_dir).resolve() != folder.resolve():
        raise ConfigError(
            "CONFIG_INVALID_SETTING",
            f"output_dir={config.output_dir!r} differs from run {record.run_id}'s folder {folder}; give one of them",
        )
    return dataclasses.replace(config, output_dir=str(folder), resume=True)
