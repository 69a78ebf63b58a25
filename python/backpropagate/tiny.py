"""Built-in tiny models, created on demand, so everything runs offline.

`tiny-llama` and `tiny-qwen2` are real Hugging Face model folders (config, safetensors
weights, tokenizer.json, tokenizer_config.json with a chat template) in the shapes of
their families, only very small. They load through exactly the same code as a hub id
or a local folder. The tokenizer is a byte-level BPE trained here on the built-in
corpus, with the family's own pre-tokenizer and special tokens, so templating, masking
and GGUF export meet what real models of the family look like.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backpropagate.examples import example_texts

# Pre-tokenizer patterns of the families (the split regexes their tokenizer.json files use).
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)

LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
CHATML_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@dataclass(frozen=True)
class TinySpec:
    """Shape and tokenizer of one built-in model."""

    name: str
    arch: str
    split_regex: str
    specials: tuple[str, ...]
    bos: str | None
    eos: str
    pad: str
    template: str
    vocab_size: int = 1024
    hidden: int = 64
    intermediate: int = 128
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2


TINY_MODELS: dict[str, TinySpec] = {
    "tiny-llama": TinySpec(
        name="tiny-llama",
        arch="llama",
        split_regex=LLAMA3_SPLIT,
        specials=(
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
        ),
        bos="<|begin_of_text|>",
        eos="<|eot_id|>",
        pad="<|end_of_text|>",
        template=LLAMA3_TEMPLATE,
    ),
    "tiny-qwen2": TinySpec(
        name="tiny-qwen2",
        arch="qwen2",
        split_regex=QWEN2_SPLIT,
        specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        bos=None,
        eos="<|im_end|>",
        pad="<|endoftext|>",
        template=CHATML_TEMPLATE,
    ),
}

# Bump when the recipe changes, so cached folders of an older recipe are rebuilt.
RECIPE_VERSION = 1


def cache_root() -> Path:
    """Where built-in models and dataset caches live (BACKPROPAGATE_HOME overrides)."""
    env = os.environ.get("BACKPROPAGATE_HOME")
    base = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "backpropagate"
    return base


def is_tiny(name: str) -> bool:
    """Whether `name` names a built-in model."""
    return name in TINY_MODELS


def ensure_tiny_model(name: str) -> Path:
    """Returns the folder of built-in model `name`, creating it on first use.

    Creation writes into a temporary folder and renames it into place, so concurrent
    callers or a kill mid-way never leave a half-written model behind.
    """
    spec = TINY_MODELS[name]
    target = cache_root() / "models" / f"{name}-v{RECIPE_VERSION}"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        _write_tokenizer(spec, tmp)
        _write_model(spec, tmp)
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _write_tokenizer(spec: TinySpec, out: Path) -> None:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(byte_fallback=False, ignore_merges=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(spec.split_regex), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=list(spec.specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(example_texts(), trainer=trainer)
    if spec.bos:
        bos_id = tok.token_to_id(spec.bos)
        tok.post_processor = processors.Sequence(
            [
                processors.ByteLevel(trim_offsets=False),
                processors.TemplateProcessing(
                    single=f"{spec.bos} $A",
                    pair=f"{spec.bos} $A {spec.bos} $B",
                    special_tokens=[(spec.bos, bos_id)],
                ),
            ]
        )
    tok.save(str(out / "tokenizer.json"))
    added = {
        str(tok.token_to_id(t)): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for t in spec.specials
    }
    config = {
        "added_tokens_decoder": added,
        "bos_token": spec.bos,
        "eos_token": spec.eos,
        "pad_token": spec.pad,
        "chat_template": spec.template,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 4096,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (out / "special_tokens_map.json").write_text(
        json.dumps({k: v for k, v in (("bos_token", spec.bos), ("eos_token", spec.eos), ("pad_token", spec.pad)) if v})
    )


def _write_model(spec: TinySpec, out: Path) -> None:
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig, Qwen2Config

    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    ids = {name: tok.token_to_id(name) for name in spec.specials}
    common: dict[str, Any] = dict(
        vocab_size=tok.get_vocab_size(),
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=ids.get(spec.bos) if spec.bos else None,
        eos_token_id=ids[spec.eos],
        pad_token_id=ids[spec.pad],
    )
    # Family defaults; transformers 5 files it under rope_parameters, older versions read rope_theta.
    common["rope_theta"] = 500000.0 if spec.arch == "llama" else 1000000.0
    config_cls = LlamaConfig if spec.arch == "llama" else Qwen2Config
    config = config_cls(**common)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    GenerationConfig(
        bos_token_id=common["bos_token_id"],
        eos_token_id=common["eos_token_id"],
        pad_token_id=common["pad_token_id"],
    ).save_pretrained(out)
