"""Model presets: a short name, the Hugging Face id, and settings known to work for it.

A preset's rank, alpha, learning rate and context are applied to every field the user
left unset (`TrainConfig` fields at `None`); anything set explicitly wins. Presets are
matched by short name (`qwen2.5-7b`) or by their Hugging Face id.
"""

from __future__ import annotations

from dataclasses import dataclass


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
    """

    name: str
    model_id: str
    params_b: float
    lora_r: int
    lora_alpha: float
    learning_rate: float
    max_seq_length: int


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
        Preset("smollm3-3b", "HuggingFaceTB/SmolLM3-3B", 3.1, 16, 32, 2e-4, 4096),
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
