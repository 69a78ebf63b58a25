"""Type stubs of the Rust extension (kept in sync by mypy.stubtest)."""

__version__: str

from collections.abc import Callable
from os import PathLike
from typing import Any

_Path = str | PathLike[str]

def convert_to_gguf(
    model_dir: _Path,
    output: _Path,
    quantization: str,
    adapter_dir: _Path | None = None,
    force: bool = False,
    llama_cpp_lib: _Path | None = None,
    name: str | None = None,
    tokenizer_dir: _Path | None = None,
    progress: Callable[[int, int], Any] | None = None,
) -> dict[str, Any]:
    """Converts a Hugging Face folder (and adapter) to GGUF; returns what was written."""

def gguf_quantizations() -> list[str]:
    """Quantization names the GGUF writer accepts."""
