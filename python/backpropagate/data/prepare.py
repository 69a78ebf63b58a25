"""`prepare`: a dataset file and a model's tokenizer in, a `PreparedDataset` out.

The Rust engine does everything (read, detect, template, tokenize, mask, filter, pack,
cache); this module resolves the model, reads Parquet through pyarrow, and wraps the
arrays. A cache hit memory-maps the cached `.npy` files, so it costs no copy.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from backpropagate import _core
from backpropagate.data.config import DataConfig
from backpropagate.data.dataset import PreparedDataset
from backpropagate.data.sentencepiece import tokenizer_json_of
from backpropagate.errors import DependencyError, InputError
from backpropagate.log import get_logger
from backpropagate.model_source import resolve_model
from backpropagate.tiny import cache_root

ARRAYS = ("input_ids", "labels", "sample_offsets", "pack_offsets", "pack_samples", "pair_id", "chosen", "kto_label")

log = get_logger(__name__)


def dataset_cache_dir() -> Path:
    """Folder of the prepared-dataset cache."""
    return cache_root() / "datasets"


def prepare(data: str | Path, model: str | Path, config: DataConfig | None = None) -> PreparedDataset:
    """Reads, templates, tokenizes, masks and packs `data` for `model`.

    Args:
        data: A JSONL file (one object per line), a JSON array file, or a Parquet file.
        model: A built-in tiny name, a local model folder, or a Hugging Face id; its
            tokenizer.json and tokenizer_config.json (chat template, special tokens) are used.
        config: Preparation settings; defaults to `DataConfig()`.

    Raises:
        InputError: a missing file, bad rows (listed with file:line unless skip_invalid),
            mixed SFT and preference rows, no usable rows, a template or tokenizer failure.
    """
    config = config or DataConfig()
    out = run_engine(data, model, config, strict=True)
    return _to_dataset(out)


def run_engine(data: str | Path, model: str | Path, config: DataConfig, *, strict: bool) -> dict[str, Any]:
    """Calls the Rust engine on `data`; `strict=False` reports problems without refusing (no cache)."""
    path = Path(data)
    raw = source_bytes(path)
    model_dir = resolve_model(model)
    tokenizer_json = tokenizer_json_of(model_dir)
    cache = str(dataset_cache_dir()) if config.cache and strict else None
    out: dict[str, Any] = _core.prepare_dataset(
        str(path), str(model_dir), config.engine_settings(), cache, raw, strict, str(tokenizer_json)
    )
    stats = json.loads(out["stats_json"])
    log_template_markers(stats)
    log_system_left_out(stats)
    if out.get("cache_error"):
        log.warning("dataset cache not written: %s", out["cache_error"])
    if out["cache"] == "rebuilt":
        log.warning("dataset cache entry was corrupt and has been rebuilt")
    return out


def log_template_markers(stats: dict[str, Any]) -> None:
    """Says whether the markers of a chosen built-in template are single tokens of the model.

    Markers the vocabulary lacks are learned as several pieces each: training works, but
    the model must learn to write each marker piece by piece.
    """
    markers = stats.get("template_markers") or []
    split = [f"{marker} ({pieces} tokens)" for marker, pieces in markers if pieces != 1]
    name = stats.get("chat_template")
    if split:
        log.warning(
            "chat template %s: %s are not single tokens of this model; each is learned as several pieces",
            name,
            ", ".join(split),
        )
    elif markers:
        log.info("chat template %s: its markers %s are single tokens of this model", name, [m for m, _ in markers])


def log_system_left_out(stats: dict[str, Any]) -> None:
    """Warns when the chat template rendered rows without their system message.

    Some templates keep it only in one conversation shape (Mistral's, when a user turn ends
    the conversation), so a training row that ends with an answer loses it silently.
    """
    if left_out := stats.get("system_left_out", 0):
        log.warning(
            "chat template %s left out the system message of %d of %d rows: they train without it "
            "(put that text into the first user message to keep it)",
            stats.get("chat_template"),
            left_out,
            stats["rows_used"],
        )


def source_bytes(path: Path) -> bytes | None:
    """What the engine reads for `path`: Parquet rows as JSONL bytes, or None (it reads the file itself).

    Raises:
        InputError: INPUT_FILE_NOT_FOUND for a missing path, INPUT_FILE_UNREADABLE for one
            this user may not reach (the engine raises it too, for a folder or an unreadable file).
    """
    try:
        path.stat()
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise InputError("INPUT_FILE_NOT_FOUND", f"{path}: no such dataset file") from exc
    except OSError as exc:  # e.g. a folder on the way that this user may not enter
        raise _unreadable(path, exc) from exc
    return parquet_as_jsonl(path) if path.suffix.lower() == ".parquet" else None


def _unreadable(path: Path, exc: OSError) -> InputError:
    # The same words as the Rust reader's (rust/error.rs read_failure).
    why = "permission denied: this user may not read it" if isinstance(exc, PermissionError) else "cannot be read"
    return InputError("INPUT_FILE_UNREADABLE", f"{path}: {why} ({exc.strerror or exc})")


def parquet_as_jsonl(path: Path) -> bytes:
    """A Parquet file's rows as JSONL bytes (line n = row n), for the engine."""
    try:
        import pyarrow
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise DependencyError("DEP_MISSING_PACKAGE", "reading Parquet needs pyarrow: pip install pyarrow") from exc
    try:
        rows = pq.read_table(path).to_pylist()
    except OSError as exc:
        raise _unreadable(path, exc) from exc
    except pyarrow.ArrowInvalid as exc:
        raise InputError("INPUT_DATASET_PARSE_FAILED", f"{path}: not a readable Parquet file: {exc}") from exc
    return "".join(json.dumps(row, ensure_ascii=False, default=str) + "\n" for row in rows).encode()


def _to_dataset(out: dict[str, Any]) -> PreparedDataset:
    if out["cache"] == "hit":
        folder = Path(out["cache_dir"])
        arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in ARRAYS}
    else:
        arrays = {name: out[name] for name in ARRAYS}
    stats = json.loads(out["stats_json"])
    stats["cache"] = out["cache"]
    stats["cache_dir"] = out.get("cache_dir")
    log.info(
        "dataset ready: %d rows read, %d used, %d samples, %d tokens in %d packed rows (cache %s)",
        stats["rows_read"],
        stats["rows_used"],
        stats["samples"],
        stats["tokens"],
        stats["rows"],
        out["cache"],
    )
    return PreparedDataset(
        kind=out["kind"],
        max_seq_length=int(out["max_seq_length"]),
        stats=stats,
        **arrays,
    )
