"""What an export starts from: a PEFT adapter folder or a full model folder.

An adapter folder (adapter_config.json) names its base model, which may be a built-in
tiny name, a local folder or a hub id; `resolve_model` turns it into a local folder. A
full model folder (after full fine-tuning) is exported as is. The trainer's run record
(`backpropagate_run.json`) is read when present, for the model card.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from backpropagate.errors import BackpropagateError, InputError
from backpropagate.model_source import resolve_model

RUN_RECORD = "backpropagate_run.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)


@dataclass
class ExportSource:
    """A resolved export source."""

    path: Path
    model_dir: Path
    adapter_dir: Path | None
    base_model: str
    peft_config: dict[str, Any] = field(default_factory=dict)
    run: dict[str, Any] | None = None

    @property
    def tokenizer_dir(self) -> Path:
        """The adapter's own tokenizer files when it saved them, else the model's.

        A model with only a SentencePiece tokenizer.model gets the folder converted for training.
        """
        from backpropagate.data.sentencepiece import tokenizer_folder

        if self.adapter_dir is not None and (self.adapter_dir / "tokenizer.json").exists():
            return self.adapter_dir
        return tokenizer_folder(self.model_dir)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError("INPUT_ADAPTER_INVALID", f"{path}: unreadable ({exc})") from exc
    if not isinstance(data, dict):
        raise InputError("INPUT_ADAPTER_INVALID", f"{path}: expected a JSON object")
    return data


def _resolve_base(name: str, adapter_dir: Path) -> Path:
    beside = adapter_dir / name
    if not Path(name).is_absolute() and beside.is_dir() and (beside / "config.json").exists():
        return beside
    try:
        return resolve_model(name)
    except BackpropagateError as exc:
        raise InputError(
            "INPUT_ADAPTER_INVALID",
            f"{adapter_dir / 'adapter_config.json'}: base_model_name_or_path {name!r} cannot be found ({exc.message})",
        ) from exc


def open_source(source: str | Path) -> ExportSource:
    """Resolves `source` (adapter folder or model folder) for export."""
    path = Path(source).expanduser()
    if not path.is_dir():
        raise InputError("INPUT_FILE_NOT_FOUND", f"{path}: no such folder (expected an adapter or model folder)")
    run_file = path / RUN_RECORD
    run = json.loads(run_file.read_text(encoding="utf-8")) if run_file.exists() else None
    adapter_cfg = path / "adapter_config.json"
    if adapter_cfg.exists():
        cfg = _read_json(adapter_cfg)
        base = cfg.get("base_model_name_or_path")
        if not isinstance(base, str) or not base:
            raise InputError("INPUT_ADAPTER_INVALID", f"{adapter_cfg}: base_model_name_or_path is missing")
        if not (path / "adapter_model.safetensors").exists():
            raise InputError("INPUT_ADAPTER_INVALID", f"{path}: adapter_model.safetensors is missing")
        return ExportSource(path, _resolve_base(base, path), path, base, cfg, run)
    if (path / "config.json").exists():
        base = (run or {}).get("base_model") or path.name
        return ExportSource(path, path, None, str(base), {}, run)
    raise InputError(
        "INPUT_MODEL_LOAD_FAILED",
        f"{path}: neither adapter_config.json nor config.json; not an adapter or model folder",
    )
