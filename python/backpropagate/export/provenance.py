"""What made a GGUF, recorded beside it (`<file>.gguf.source.json`).

Converting again what is already on disk costs minutes for a large model, and refusing
with STATE_OUTPUT_EXISTS stops `export --ollama` after a plain `export` of the same run.
So the record names the source folder, the size and modification time of every file the
conversion read (weights, configs, tokenizer), the GGUF type and the converter version,
and the GGUF's own size and time. An export that would make exactly this file reuses it;
anything else (another adapter, base, type, or a file changed since) is still refused
without `force`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from backpropagate.export.files import write_text_atomic
from backpropagate.export.source import TOKENIZER_FILES, ExportSource

SUFFIX = ".source.json"
_READ_BY_CONVERSION = {"config.json", "adapter_config.json", *TOKENIZER_FILES}


def record_path(gguf: Path) -> Path:
    """Where the record of `gguf` lives."""
    return gguf.with_name(gguf.name + SUFFIX)


def _stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def describe(src: ExportSource, quantization: str) -> dict[str, Any]:
    """What a conversion of `src` to `quantization` depends on."""
    from backpropagate import _core

    inputs: dict[str, list[int]] = {}
    for folder in dict.fromkeys((src.path, src.model_dir, src.tokenizer_dir)):
        for path in sorted(folder.iterdir()):
            if path.is_file() and (path.suffix == ".safetensors" or path.name in _READ_BY_CONVERSION):
                inputs[str(path.resolve())] = _stamp(path)
    return {
        "source": str(src.path.resolve()),
        "base_model": src.base_model,
        "quantization": quantization,
        "converter": _core.__version__,
        "inputs": inputs,
    }


def why_not_reusable(gguf: Path, wanted: dict[str, Any]) -> str | None:
    """None when `gguf` was made from exactly `wanted`, else what differs (for the error)."""
    try:
        recorded = json.loads(record_path(gguf).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "nothing records what made it"
    if not isinstance(recorded, dict) or recorded.get("gguf") != _stamp(gguf):
        return "it changed after it was written"
    for key in ("source", "base_model", "quantization", "converter"):
        if recorded.get(key) != wanted[key]:
            return f"it was made with {key} {recorded.get(key)!r}, not {wanted[key]!r}"
    if recorded.get("inputs") != wanted["inputs"]:
        return "the source files changed since it was made"
    return None


def write_record(gguf: Path, described: dict[str, Any], types: dict[str, int]) -> Path:
    """Records what made `gguf` (just written) and its tensor types."""
    path = record_path(gguf)
    write_text_atomic(path, json.dumps({**described, "gguf": _stamp(gguf), "types": types}, indent=2) + "\n")
    return path


def recorded_types(gguf: Path) -> dict[str, int]:
    """Tensor types counted when `gguf` was written."""
    types = json.loads(record_path(gguf).read_text(encoding="utf-8")).get("types")
    return {str(k): int(v) for k, v in types.items()} if isinstance(types, dict) else {}
