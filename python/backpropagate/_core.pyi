"""Type stubs of the Rust extension (kept in sync by mypy.stubtest)."""

from collections.abc import Callable
from os import PathLike
from typing import Any, final

__version__: str

_Path = str | PathLike[str]

def prepare_dataset(
    source: str,
    model_dir: str,
    settings_json: str,
    cache_root: str | None = None,
    data: bytes | None = None,
    strict: bool = True,
    tokenizer_json: str | None = None,
) -> dict[str, Any]: ...
def verify_dataset_cache(entry: str) -> str: ...
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

def render_chat_template(
    template: str, messages_json: str, add_generation_prompt: bool = False, globals_json: str = "{}"
) -> str: ...

@final
class DataTokenizer:
    def __new__(cls, model_dir: str, fast: bool = True, tokenizer_json: str | None = None) -> DataTokenizer: ...
    @property
    def fast_bpe(self) -> bool: ...
    def encode(self, text: str) -> tuple[list[int], list[tuple[int, int]]]: ...
    def encode_document(self, text: str) -> list[int]: ...
    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...

def detect_row(line: str) -> str: ...
def pack_bfd(lengths: list[int], capacity: int) -> tuple[list[int], list[int]]: ...
def scan_dataset(source: str, max_errors: int = 20, data: bytes | None = None, skip_invalid: bool = False) -> str: ...
