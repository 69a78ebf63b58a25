"""MLX adapters in PEFT's layout, both ways.

An adapter trained on MLX is saved exactly as peft saves one: `adapter_config.json` (a
peft `LoraConfig`) and `adapter_model.safetensors` with peft's key names
(`base_model.model.<layer path>.lora_A.weight` r x in, `lora_B.weight` out x r, DoRA's
`lora_magnitude_vector`), so `backprop export`, peft and transformers read it whichever
rail trained it. `save_final` (train/outputs.py) drives both folder kinds through the
same `save_pretrained` call it makes on a peft model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import mlx.core as mx
import numpy as np
from safetensors.numpy import save_file

from backpropagate.errors import InputError
from backpropagate.train.mlx.model import flatten

if TYPE_CHECKING:
    from backpropagate.train.mlx.model import MlxTrainingModel

PREFIX = "base_model.model."
# MLX parameter name -> peft's name for it (after the layer path).
PEFT_NAMES = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight", "magnitude": "lora_magnitude_vector"}


def peft_state(tm: MlxTrainingModel) -> dict[str, np.ndarray]:
    """The adapter's arrays under peft's key names, fp32."""
    state = {}
    for name, value in flatten(tm.net.trainable_parameters()).items():
        path, leaf = name.rsplit(".", 1)
        state[f"{PREFIX}{path}.{PEFT_NAMES[leaf]}"] = np.array(value.astype(mx.float32))
    return state


def load_peft_state(tm: MlxTrainingModel, tensors: dict[str, Any]) -> None:
    """Sets the adapter from peft-named arrays (a saved adapter, or a live peft model's `.default.` names)."""
    by_peft = {f"{PREFIX}{path}.{PEFT_NAMES[leaf]}": (path, leaf) for path, leaf in _trainable_names(tm)}
    updates = []
    for key, value in tensors.items():
        name = key.replace(".default.", ".").replace(".default", "")
        if name.endswith("lora_magnitude_vector.weight"):
            name = name.removesuffix(".weight")
        if name not in by_peft:
            raise InputError("INPUT_ADAPTER_INVALID", f"adapter tensor {key} matches no adapted layer of {tm.path}")
        path, leaf = by_peft.pop(name)
        updates.append((f"{path}.{leaf}", mx.array(np.asarray(value, dtype=np.float32))))
    if by_peft:
        raise InputError("INPUT_ADAPTER_INVALID", f"adapter lacks {len(by_peft)} tensor(s), e.g. {next(iter(by_peft))}")
    tm.net.load_weights(updates, strict=False)
    mx.eval(tm.net.parameters())


def _trainable_names(tm: MlxTrainingModel) -> list[tuple[str, str]]:
    """(layer path, leaf) of every trainable array."""
    return [(name.rsplit(".", 1)[0], name.rsplit(".", 1)[1]) for name in flatten(tm.net.trainable_parameters())]


def lora_config(tm: MlxTrainingModel) -> Any:
    """The peft `LoraConfig` of the adapter."""
    from peft import LoraConfig

    config = tm.config
    return LoraConfig(
        r=cast(int, config.lora_r),
        lora_alpha=cast(Any, config.lora_alpha),
        lora_dropout=config.lora_dropout,
        target_modules=tm.adapted,
        use_rslora=config.rslora,
        use_dora=config.dora,
        bias="none",
        task_type="CAUSAL_LM",
    )


class PeftAdapterFolder:
    """The `save_pretrained` face of an MLX adapter (what `save_final` calls on a peft model)."""

    def __init__(self, tm: MlxTrainingModel) -> None:
        self.tm = tm
        self.peft_config = {"default": lora_config(tm)}

    def save_pretrained(self, path: Path, safe_serialization: bool = True, save_embedding_layers: bool = False) -> None:
        """Writes adapter_config.json and adapter_model.safetensors into `path` (peft's signature; no embeddings)."""
        path.mkdir(parents=True, exist_ok=True)
        self.peft_config["default"].save_pretrained(str(path))
        save_file(peft_state(self.tm), str(path / "adapter_model.safetensors"), metadata={"format": "pt"})


class FullModelFolder:
    """The `save_pretrained` face of a fully fine-tuned MLX model: a Hugging Face model folder."""

    def __init__(self, tm: MlxTrainingModel) -> None:
        self.tm = tm

    def save_pretrained(self, path: Path, safe_serialization: bool = True) -> None:
        """Writes config.json (the base model's) and model.safetensors with the Hugging Face weight names."""
        path.mkdir(parents=True, exist_ok=True)
        for name in ("config.json", "generation_config.json"):
            if (self.tm.path / name).exists():
                shutil.copyfile(self.tm.path / name, path / name)
        config = json.loads((path / "config.json").read_text())
        config["torch_dtype"] = config["dtype"] = "float32"
        (path / "config.json").write_text(json.dumps(config, indent=2))
        weights = {k: np.array(v.astype(mx.float32)) for k, v in flatten(self.tm.net.parameters()).items()}
        save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
