"""Type stubs of the Rust extension (kept in sync by mypy.stubtest)."""

from typing import Any

__version__: str

def prepare_dataset(
    source: str,
    model_dir: str,
    settings_json: str,
    cache_root: str | None = None,
    data: bytes | None = None,
    strict: bool = True,
) -> dict[str, Any]: ...
def verify_dataset_cache(entry: str) -> str: ...
def render_chat_template(
    template: str, messages_json: str, add_generation_prompt: bool = False, globals_json: str = "{}"
) -> str: ...

class DataTokenizer:
    def __new__(cls, model_dir: str, fast: bool = True) -> DataTokenizer: ...
    @property
    def fast_bpe(self) -> bool: ...
    def encode(self, text: str) -> tuple[list[int], list[tuple[int, int]]]: ...
    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...
