"""Tiny random Hugging Face models of each architecture the GGUF writer supports,
built from their transformers configs with the real tokenizer of the family."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from conftest import real_tokenizer

# family -> (config class name, tokenizer folder in shared/ or from a package, extra config fields)
FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama": (
        "LlamaConfig",
        "llama-3.2-3b-instruct",
        {
            "rope_theta": 500000.0,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 32.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
            "tie_word_embeddings": True,
        },
    ),
    "mistral": ("MistralConfig", "mistral-v0.3", {"rope_theta": 1000000.0, "sliding_window": None}),
    "qwen2": ("Qwen2Config", "qwen2.5-0.5b-instruct", {"tie_word_embeddings": True}),
    "qwen3": ("Qwen3Config", "qwen3", {"head_dim": 32}),
    "phi3": ("Phi3Config", "phi-3-mini", {"vocab_size": 32064, "pad_token_id": 32000}),
    "smollm3": ("SmolLM3Config", "llama-3.2-3b-instruct", {"tie_word_embeddings": True}),
    # Phi-4-mini: phi3 with a quarter of each head left unrotated, tied embeddings and long-rope
    # factors (one per rotated pair); its o200k_base tokenizer and 200,064 embedding rows.
    "phi4-mini": (
        "Phi3Config",
        "phi4-mini",
        {
            "vocab_size": 200064,
            "pad_token_id": 199999,
            "tie_word_embeddings": True,
            "max_position_embeddings": 131072,
            "rope_parameters": {
                "rope_type": "longrope",
                "rope_theta": 10000.0,
                "partial_rotary_factor": 0.75,
                "original_max_position_embeddings": 4096,
                "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5],
                "long_factor": [1.0, 2.0, 4.0, 8.0, 16.0, 32.0],
            },
        },
    ),
    # Gemma 2 as llama.cpp's gemma2 runs it: sliding and global layers alternating, queries scaled
    # by 1/sqrt(head_dim), attention scores capped at 5 (published: 50, which these weights' scores
    # never reach) and final logits at 30 as published. Weights of std 0.5 keep the untrained
    # model's top-5 apart (at 0.2 its fifth and sixth logits differ by 1e-6). The window (8) is
    # shorter than the prompt.
    "gemma2": (
        "Gemma2Config",
        "llama-3.2-3b-instruct",
        {
            "num_hidden_layers": 4,
            "head_dim": 16,
            "query_pre_attn_scalar": 16,
            "sliding_window": 8,
            "attn_logit_softcapping": 5.0,
            "final_logit_softcapping": 30.0,
            "initializer_range": 0.5,
            "tie_word_embeddings": True,
        },
    ),
    # Gemma 3 as llama.cpp's gemma3 runs it: five sliding layers then a global one, sliding rope
    # base 10000, queries scaled by 1/sqrt(head_dim); linear rope scaling on the global layers
    # and final soft-capping as the 4B+ models have them. The window (8) is shorter than the prompt.
    "gemma3": (
        "Gemma3TextConfig",
        "llama-3.2-3b-instruct",
        {
            "num_hidden_layers": 6,
            "head_dim": 16,
            "query_pre_attn_scalar": 16,
            "sliding_window": 8,
            "final_logit_softcapping": 3.0,
            "rope_parameters": {
                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            },
            "tie_word_embeddings": True,
        },
    ),
}


def build_model(
    family: str,
    out: Path,
    hidden: int = 64,
    layers: int = 2,
    dtype: str = "float32",
    std: float = 0.2,
    tokenizer_dir: Path | None = None,
    **overrides: Any,
) -> Path:
    """Saves a random model of `family` with its real tokenizer (or `tokenizer_dir`) into `out`."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    cls_name, tok_name, extra = FAMILIES[family]
    tok_dir = tokenizer_dir or real_tokenizer(tok_name)
    out.mkdir(parents=True, exist_ok=True)
    for f in tok_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, out / f.name)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    fields: dict[str, Any] = dict(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        initializer_range=std,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    fields.update(extra)
    fields.update(overrides)
    config = getattr(transformers, cls_name)(**fields)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    model.save_pretrained(out)
    return out
