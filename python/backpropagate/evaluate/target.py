"""What `backprop eval` can evaluate: a recorded run, an adapter folder, a full model folder or a base model.

Each resolves to a base model folder, an optional PEFT adapter on top, the tokenizer to
prepare data with, and the data settings the run trained with (so held-out data gets the
same template, masking and length as the training data did).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from backpropagate.errors import StateError
from backpropagate.export.source import open_source
from backpropagate.model_source import resolve_model
from backpropagate.presets import find_preset
from backpropagate.tiny import is_tiny


@dataclass
class EvalTarget:
    """A resolved evaluation target.

    Attributes:
        name: What the user named (run id, folder or model).
        base_model: The base model's name (preset, hub id or folder).
        model_dir: Base model folder (or the full model folder).
        adapter_dir: PEFT adapter folder applied on top, if any.
        tokenizer_dir: Folder whose tokenizer and chat template prepare the data.
        run_id: The training run the target came from, when known.
        data_config: The data settings that run trained with (empty when unknown).
    """

    name: str
    base_model: str
    model_dir: Path
    adapter_dir: Path | None
    tokenizer_dir: Path
    run_id: str | None = None
    data_config: dict[str, Any] = field(default_factory=dict)


def looks_like_model(name: str) -> bool:
    """A built-in model, a preset, or a Hugging Face id (owner/name), as opposed to a run id."""
    return is_tiny(name) or find_preset(name) is not None or name.count("/") == 1


def resolve_target(name: str | Path) -> EvalTarget:
    """Turns a run id (or unique prefix), an adapter or model folder, or a model name into an `EvalTarget`.

    Raises:
        InputError: INPUT_ADAPTER_INVALID / INPUT_MODEL_LOAD_FAILED for a folder that is neither a
            usable adapter nor a model.
        StateError: STATE_RUN_NOT_FOUND for an unknown run id, STATE_RUN_OUTPUT_MISSING for a run
            without a finished adapter.
        ConfigError: CONFIG_RUN_ID_AMBIGUOUS for a prefix of several runs.
    """
    text = str(name)
    path = Path(text).expanduser()
    if path.is_dir():
        return _from_folder(text, path)
    if looks_like_model(text) or path.suffix == ".gguf":
        model_dir = resolve_model(text)
        return EvalTarget(text, text, model_dir, None, model_dir)
    from backpropagate.runs.store import RunStore

    store = RunStore()
    store.reap_dead()
    record = store.find(text)
    folder = record.outputs.get("adapter_dir")
    if record.command != "train" or not isinstance(folder, str) or not Path(folder).is_dir():
        raise StateError(
            "STATE_RUN_OUTPUT_MISSING",
            f"run {record.run_id} ({record.command}, {record.status}) has no adapter or model folder to evaluate"
            + (f" ({folder} is gone)" if isinstance(folder, str) else ""),
        )
    target = _from_folder(text, Path(folder))
    target.run_id = record.run_id
    return target


def _from_folder(name: str, path: Path) -> EvalTarget:
    source = open_source(path)
    run = source.run or {}
    data_config = run.get("data_config")
    return EvalTarget(
        name,
        source.base_model,
        source.model_dir,
        source.adapter_dir,
        source.tokenizer_dir,
        run.get("run_id"),
        data_config if isinstance(data_config, dict) else {},
    )
