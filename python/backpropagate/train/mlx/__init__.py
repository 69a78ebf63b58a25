"""The MLX rail: Apple's MLX with mlx-lm, on Apple GPUs and (mlx-lm[cpu]) on Linux CPUs.

It trains the same `PreparedDataset` as the torch rail (packed rows, assistant-only labels,
sample boundaries) and writes the same run folder, so export and peft read its adapters
unchanged. `model.py` loads and adapts the model, `losses.py` holds the objectives,
`loop.py` the loop, `adapters.py` the PEFT layout, `checkpoint.py` the checkpoints.
Nothing here imports mlx at module import time except through `require_mlx`.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Any

from backpropagate.errors import DependencyError

if TYPE_CHECKING:
    from backpropagate.config import TrainConfig
    from backpropagate.data.dataset import PreparedDataset
    from backpropagate.train.mlx.model import MlxTrainingModel
    from backpropagate.train.torch.loop import LoopOutcome

INSTALL = "pip install 'backpropagate[mlx]'  (Linux: installs mlx-lm[cpu])"


def mlx_importable() -> bool:
    """Whether mlx and mlx-lm import here (plain `mlx` on Linux is a stub that fails to import)."""
    if importlib.util.find_spec("mlx") is None or importlib.util.find_spec("mlx_lm") is None:
        return False
    try:
        import mlx.core  # noqa: F401
        import mlx_lm  # noqa: F401
    except Exception:  # a stub or broken install is the same as none
        return False
    return True


def require_mlx() -> Any:
    """`mlx.core`, or DEP_MLX_UNAVAILABLE with the install line."""
    if not mlx_importable():
        raise DependencyError("DEP_MLX_UNAVAILABLE", f"backend='mlx' needs mlx and mlx-lm: {INSTALL}")
    import mlx.core as mx

    return mx


def run(
    path: Path,
    dataset: PreparedDataset,
    config: TrainConfig,
    total_steps: int,
    output_dir: Path,
    run_id: str,
    fingerprint: dict[str, Any],
    step_rows: int | None = None,
) -> tuple[MlxTrainingModel, LoopOutcome]:
    """Loads the model and trains it on MLX: (the trained model for `save_final`, the loop's outcome)."""
    from backpropagate.train.mlx.support import check_supported

    check_supported(config)
    require_mlx()
    from backpropagate.train.mlx import loop, model

    tm = model.load_for_training(path, config)
    return tm, loop.train(tm, dataset, config, total_steps, output_dir, run_id, fingerprint, step_rows)
