"""The final artifacts of a run: the adapter (or full model) folder with tokenizer files and run file.

The folder is what `export` reads and what peft / transformers load: PEFT-format adapter
(`adapter_config.json` + `adapter_model.safetensors`) or a full safetensors model, the base
model's tokenizer files, `backpropagate_run.json` (what was trained, how, on what, with
which result, and the command that reproduces it) and a copy of the loss curve. It is
written under a temporary name and renamed into place, like everything else we write.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from backpropagate.export.files import apply_default_modes, fsync_tree, remove_leftovers, replace_dir, temp_path
from backpropagate.train.checkpoint import write_durable
from backpropagate.train.torch.loading import TrainingModel

RUN_FILE = "backpropagate_run.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)


def adapts_embeddings(model: Any) -> bool:
    """Whether an adapter wraps an embedding layer (peft then saves the embedding weights too).

    An MLX rail's adapter has no torch modules and never adapts embeddings.
    """
    modules = getattr(model, "modules", None)
    return callable(modules) and any(isinstance(getattr(m, "base_layer", None), torch.nn.Embedding) for m in modules())


def save_final(
    tm: TrainingModel,
    output_dir: Path,
    base_model_path: Path,
    base_model_ref: str,
    run_info: dict[str, Any],
    loss_curve: Path | None,
    state_dict: dict[str, Any] | None = None,
) -> Path:
    """Writes `adapter/` (adapter modes) or `model/` (full fine-tuning) under `output_dir` and returns it.

    `state_dict` holds the weights of a model sharded over processes, gathered whole.
    """
    model: Any = tm.model
    whole = {"state_dict": state_dict} if state_dict is not None else {}
    final = output_dir / ("model" if tm.mode == "full" else "adapter")
    remove_leftovers(output_dir, [final.name])
    partial = temp_path(final)
    shutil.rmtree(partial, ignore_errors=True)
    if tm.mode == "full":
        model.save_pretrained(partial, safe_serialization=True, **whole)
    else:
        model.peft_config["default"].base_model_name_or_path = base_model_ref
        # Whole embedding matrices are saved only when adapted: peft's "auto" asks the hub whether the
        # base's vocabulary differs, which training here never changes (and which fails offline).
        model.save_pretrained(partial, safe_serialization=True, save_embedding_layers=adapts_embeddings(model), **whole)
    for name in TOKENIZER_FILES:
        if (base_model_path / name).exists():
            shutil.copyfile(base_model_path / name, partial / name)
    if loss_curve is not None and loss_curve.exists():
        shutil.copyfile(loss_curve, partial / loss_curve.name)
    write_durable(partial / RUN_FILE, json.dumps(run_info, indent=2).encode())
    apply_default_modes(partial)  # safetensors writes 0600 files; outputs get the umask's modes
    fsync_tree(partial)
    replace_dir(partial, final)
    return final
