"""What this machine can run: versions, GPU, installed extras, usable backends.

Probing imports nothing heavy unless it is installed, and never fails: a missing or
broken package shows up as `null`, which is exactly what a bug report needs.
"""

from __future__ import annotations

import importlib.util
import platform
import sys
from importlib.metadata import PackageNotFoundError, version
from typing import Any

# Distribution name -> what it enables.
EXTRAS = {
    "torch": "training on CUDA/CPU",
    "transformers": "model loading",
    "peft": "LoRA / DoRA adapters",
    "bitsandbytes": "QLoRA (4-bit)",
    "fla-core": "Qwen3.5 linear attention as one varlen kernel per packed row (CUDA)",
    "trl": "reference losses in tests",
    "liger-kernel": "fused GPU kernels",
    "xllamacpp": "GGUF loading and generation",
    "llama-cpp-python": "GGUF loading and generation",
    "mlx-lm": "MLX backend",
    "matplotlib": "loss curve plots",
    "tensorboard": "TensorBoard metrics",
    "wandb": "Weights & Biases metrics",
}


def _dist_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _gpus() -> tuple[bool, str | None, list[dict[str, Any]]]:
    if importlib.util.find_spec("torch") is None:
        return False, None, []
    try:
        import torch
    except Exception:  # a broken torch install is reported as absent
        return False, None, []
    if not torch.cuda.is_available():
        return False, torch.version.cuda, []
    gpus = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        gpus.append(
            {
                "index": i,
                "name": props.name,
                "vram_gib": round(props.total_memory / 2**30, 1),
                "compute_capability": f"{props.major}.{props.minor}",
            }
        )
    return True, torch.version.cuda, gpus


def _mlx_rail() -> dict[str, Any]:
    """What the MLX rail can run here: whether mlx imports, versions, device, modes and methods."""
    from backpropagate.train.mlx import mlx_importable
    from backpropagate.train.mlx.support import MLX_METHODS, MLX_MODES

    usable = mlx_importable()
    device = None
    if usable:
        import mlx.core as mx

        device = "gpu" if mx.default_device() == mx.gpu else "cpu"
    return {
        "usable": usable,
        "mlx": _dist_version("mlx"),
        "mlx_lm": _dist_version("mlx-lm"),
        "device": device,
        "modes": [m for m in MLX_MODES if m != "auto"] if usable else [],
        "methods": list(MLX_METHODS) if usable else [],
    }


def _cpu_bf16() -> bool | None:
    """Whether the CPU multiplies bf16 itself, so `precision=auto` trains in bf16 on it (None without torch)."""
    if _dist_version("torch") is None:
        return None
    from backpropagate.train.torch.precision import cpu_computes_bf16

    return cpu_computes_bf16()


def collect() -> dict[str, Any]:
    """Everything `backprop info` reports, as plain data."""
    from backpropagate import __version__

    cuda, cuda_version, gpus = _gpus()
    mlx = _mlx_rail()
    try:
        import backpropagate._core as _core

        core = _core.__version__
    except ImportError:
        core = None
    return {
        "backpropagate": __version__,
        "core": core,
        "python": platform.python_version(),
        "executable": sys.executable,
        "os": f"{platform.system()} {platform.release()}",
        "machine": platform.machine(),
        "torch": _dist_version("torch"),
        "cuda": cuda,
        "cuda_version": cuda_version,
        "gpus": gpus,
        "extras": {name: _dist_version(name) for name in EXTRAS},
        "backends": {"cuda": cuda, "mlx": mlx["usable"], "cpu": _dist_version("torch") is not None},
        "cpu_bf16": _cpu_bf16(),
        "mlx": mlx,
    }
