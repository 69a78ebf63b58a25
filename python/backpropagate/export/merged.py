"""Merged export: the adapter folded into a bf16 copy of its base, as a full HF folder.

The base is always loaded in bf16 from its original weights, so a QLoRA run merges into
the dequantized bf16 base and never into 4-bit weights. DoRA merges through PEFT too.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from backpropagate.errors import InputError
from backpropagate.export.source import TOKENIZER_FILES, ExportSource
from backpropagate.log import quiet_bitsandbytes_import


def write_merged(src: ExportSource, out_dir: Path, max_shard_size: str = "5GB") -> None:
    """Writes config, sharded safetensors, generation config and tokenizer files."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(src.model_dir, dtype=torch.bfloat16)
    except Exception as exc:
        raise InputError("INPUT_MODEL_LOAD_FAILED", f"{src.model_dir}: cannot load the base model ({exc})") from exc
    if src.adapter_dir is not None:
        with quiet_bitsandbytes_import():
            from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(model, src.adapter_dir).merge_and_unload()
        except Exception as exc:
            raise InputError("INPUT_ADAPTER_INVALID", f"{src.adapter_dir}: cannot merge ({exc})") from exc
    model.save_pretrained(out_dir, max_shard_size=max_shard_size, safe_serialization=True)
    for name in TOKENIZER_FILES:
        for folder in (src.tokenizer_dir, src.model_dir):
            if (folder / name).is_file():
                shutil.copy2(folder / name, out_dir / name)
                break
    gen = src.model_dir / "generation_config.json"
    if gen.is_file():
        shutil.copy2(gen, out_dir / "generation_config.json")
