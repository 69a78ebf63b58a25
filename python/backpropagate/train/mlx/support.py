"""What the MLX rail trains, checked before anything is loaded.

KTO needs reference passes with the adapter switched off inside each step, which the MLX
rail does not run; 8-bit optimizers and CUDA devices are torch-rail features. Each of
these is refused with CONFIG_INVALID_SETTING naming the combination, never dropped.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from backpropagate.errors import ConfigError

if TYPE_CHECKING:
    from backpropagate.config import TrainConfig

MLX_METHODS = ("sft", "orpo", "simpo")
MLX_MODES = ("auto", "lora", "qlora", "full")


def check_supported(config: TrainConfig) -> None:
    """Refuses settings the MLX rail cannot honour."""
    problems = []
    if config.method not in MLX_METHODS:
        problems.append(f"method={config.method!r} (MLX trains {', '.join(MLX_METHODS)})")
    if config.mode not in MLX_MODES:
        problems.append(f"mode={config.mode!r}")
    if config.optimizer != "adamw":
        problems.append(f"optimizer={config.optimizer!r} (bitsandbytes is CUDA/torch only; use adamw)")
    if config.device not in ("auto", "cpu"):
        problems.append(f"device={config.device!r} (MLX picks its own device: the Apple GPU, else the CPU)")
    if config.precision != "auto":
        problems.append(f"precision={config.precision!r} (MLX trains in the model's own dtype)")
    if config.gradient_checkpointing == "on":
        problems.append("gradient_checkpointing='on' (not implemented on MLX; use auto or off)")
    if config.offload_activations == "on":
        problems.append("offload_activations='on' (not implemented on MLX; use auto or off)")
    if problems:
        raise ConfigError(
            "CONFIG_INVALID_SETTING",
            f"backend='mlx' with {'; '.join(problems)} is not supported; use backend='torch' for it",
        )
