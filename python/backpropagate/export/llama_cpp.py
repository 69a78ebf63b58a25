"""Locating llama.cpp (the `xllamacpp` wheel) for quantization kernels and generation."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

from backpropagate.errors import DependencyError


def load_xllamacpp() -> ModuleType:
    """Imports xllamacpp or raises DEP_LLAMA_CPP_UNAVAILABLE."""
    try:
        import xllamacpp
    except ImportError as exc:
        raise DependencyError(
            "DEP_LLAMA_CPP_UNAVAILABLE", f"llama.cpp bindings (xllamacpp) are not installed ({exc})"
        ) from exc
    return xllamacpp


def library_path() -> Path:
    """Path of the shared library holding llama.cpp's ggml kernels."""
    module = load_xllamacpp()
    native = getattr(module, "xllamacpp", None)
    path = Path(getattr(native, "__file__", "") or "")
    if not path.is_file():
        raise DependencyError(
            "DEP_LLAMA_CPP_UNAVAILABLE", "xllamacpp is installed but its native library was not found"
        )
    return path
