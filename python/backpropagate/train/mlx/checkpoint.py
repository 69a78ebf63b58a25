"""Checkpoints of the MLX rail, with the torch rail's guarantees and folder protocol.

A checkpoint is `step-NNNNNN/` holding the trainable arrays (`trainable.safetensors`),
the optimizer state (`optimizer.safetensors`: AdamW moments, step count) and
`state.json` (the shared `TrainState`). It is written under `.partial`, every file
fsynced, renamed into place and the parent fsynced (`train/checkpoint.py`), so a
folder without the suffix is always complete. No random state is stored: the loop seeds
each step's dropout from (seed, step), so resuming replays the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from backpropagate.errors import StateError
from backpropagate.log import get_logger
from backpropagate.train.checkpoint import (
    WEIGHTS,
    TrainState,
    checkpoints,
    read_state,
    write_checkpoint,
)

log = get_logger("train")

OPTIMIZER = "optimizer.safetensors"


def _host(arrays: dict[str, mx.array]) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in arrays.items()}


def save_checkpoint(
    root: Path, state: TrainState, trainable: dict[str, mx.array], optimizer_state: dict[str, Any], keep: int
) -> Path:
    """Writes checkpoint `state.step` of the MLX rail atomically under `root` and keeps the newest `keep`."""
    files = {
        WEIGHTS: save_safetensors(_host(trainable)),
        OPTIMIZER: save_safetensors(_host(dict(tree_flatten(optimizer_state)))),
    }
    return write_checkpoint(root, state, files, keep)


@dataclass
class LoadedCheckpoint:
    """An MLX checkpoint read back from disk."""

    path: Path
    state: TrainState
    trainable: dict[str, mx.array]
    optimizer_state: dict[str, Any]


def load(path: Path) -> LoadedCheckpoint:
    """Reads one checkpoint folder; STATE_CHECKPOINT_INVALID when it is damaged or not an MLX checkpoint."""
    state = read_state(path)
    try:
        trainable = {k: mx.array(v) for k, v in load_safetensors((path / WEIGHTS).read_bytes()).items()}
        flat = load_safetensors((path / OPTIMIZER).read_bytes())
    except (OSError, ValueError) as exc:
        raise StateError(
            "STATE_CHECKPOINT_INVALID",
            f"{path} is not a readable MLX checkpoint ({type(exc).__name__}: {exc}); a checkpoint of the torch "
            "rail resumes only with backend='torch'",
        ) from exc
    optimizer_state = tree_unflatten([(k, mx.array(v)) for k, v in flat.items()])
    return LoadedCheckpoint(path=path, state=state, trainable=trainable, optimizer_state=optimizer_state)


def load_latest(root: Path) -> LoadedCheckpoint:
    """Reads the newest intact checkpoint under `root`, falling back past damaged ones (as the torch rail does).

    Raises:
        StateError: STATE_CHECKPOINT_NOT_FOUND when there is none, STATE_CHECKPOINT_INVALID when none can be read.
    """
    found = checkpoints(root)
    if not found:
        raise StateError("STATE_CHECKPOINT_NOT_FOUND", f"no checkpoint under {root}")
    errors = []
    for path in reversed(found):
        try:
            return load(path)
        except StateError as err:
            log.warning("checkpoint %s cannot be read, trying the one before it: %s", path.name, err.message)
            errors.append(err.message)
    raise StateError("STATE_CHECKPOINT_INVALID", f"no intact checkpoint under {root}: {errors[0]}")
