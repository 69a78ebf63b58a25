"""Which rail trains a run: `backend="auto" | "torch" | "mlx"`.

`auto` is the torch rail on a CUDA GPU, MLX on Apple Silicon (macOS arm64 with mlx
importable), and the torch rail on the CPU everywhere else: on Linux MLX runs on the CPU
only, where the torch rail is the default.
"""

from __future__ import annotations

import platform
import sys

BACKENDS = ("auto", "torch", "mlx")


def is_apple_silicon() -> bool:
    """MacOS on an arm64 CPU."""
    return sys.platform == "darwin" and platform.machine() == "arm64"


def resolve_backend(name: str) -> str:
    """The rail `name` stands for on this machine: "torch" or "mlx"."""
    if name != "auto":
        return name
    import torch

    if torch.cuda.is_available():
        return "torch"
    from backpropagate.train.mlx import mlx_importable

    return "mlx" if is_apple_silicon() and mlx_importable() else "torch"
