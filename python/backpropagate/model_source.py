"""Turns what a user names as a model into a local folder of Hugging Face files.

One resolution path for every caller (data engine, trainers, export): a built-in tiny
name is created on demand, a local folder is used as is, a GGUF file is dequantized once
into a cached folder (`gguf_source`), a preset whose model an installed package ships as a
GGUF loads from that file, and anything else is taken as a Hugging Face id and fetched
into the hub cache (which works offline once cached).
"""

from __future__ import annotations

from pathlib import Path

from backpropagate.errors import ConfigError, DependencyError, InputError
from backpropagate.gguf_source import gguf_model_folder, is_gguf_path
from backpropagate.presets import bundled_gguf, find_preset
from backpropagate.tiny import ensure_tiny_model, is_tiny

# What a hub fetch asks for: config, tokenizer and the safetensors index first (enough to
# size the model and tokenize data), the weights only when training loads them.
CONFIG_PATTERNS = ["*.json", "*.model", "*.txt", "*.jinja"]
WEIGHT_PATTERNS = [*CONFIG_PATTERNS, "*.safetensors"]


def resolve_model(name: str | Path, weights: bool = True) -> Path:
    """Returns the local folder holding `name`'s config, tokenizer and weights.

    Args:
        name: A built-in name (`tiny-llama`), a local folder, a `.gguf` file, a preset
            name, or a Hugging Face id.
        weights: False fetches a hub id without its weights (`CONFIG_PATTERNS`), so a
            size check can refuse a model before gigabytes are downloaded.

    Raises:
        InputError: INPUT_MODEL_LOAD_FAILED when a local folder lacks config.json or a
            GGUF cannot be loaded; INPUT_FILE_NOT_FOUND when a GGUF file is missing.
        ConfigError: CONFIG_UNKNOWN_MODEL when the id cannot be found or fetched.
    """
    text = str(name)
    if is_tiny(text):
        return ensure_tiny_model(text)
    if is_gguf_path(text):
        return gguf_model_folder(Path(text))
    preset = find_preset(text)
    if preset is not None:
        bundled = bundled_gguf(preset)
        if bundled is not None:
            return gguf_model_folder(bundled)
        text = preset.model_id
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists() and not (path / "tokenizer.json").exists():
            raise InputError("INPUT_MODEL_LOAD_FAILED", f"{path}: no config.json or tokenizer.json in this folder")
        return path
    if path.exists() or text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise ConfigError("CONFIG_UNKNOWN_MODEL", f"{text!r} is neither a model folder nor a Hugging Face id")
    return _fetch_from_hub(text, WEIGHT_PATTERNS if weights else CONFIG_PATTERNS)


def _fetch_from_hub(repo_id: str, patterns: list[str]) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:
        raise DependencyError("DEP_MISSING_PACKAGE", "huggingface_hub is needed to fetch models by id") from exc
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as exc:  # offline, unknown id, gated repo: all end the same way for the user
        reason = (str(exc).strip().splitlines() or [""])[0]  # the hub's errors go on for paragraphs
        raise ConfigError(
            "CONFIG_UNKNOWN_MODEL", f"could not find or fetch {repo_id!r} ({type(exc).__name__}: {reason})"
        ) from exc
