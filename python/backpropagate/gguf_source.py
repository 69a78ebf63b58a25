"""A GGUF file (llama.cpp, Ollama) as a model to fine-tune: dequantized once into a cached HF folder.

Training needs dense weights and Hugging Face files; a GGUF holds quantized blocks and
llama.cpp's metadata. transformers reads both; this module turns its reading into a
normal model folder (bf16 safetensors, config.json, generation_config.json,
tokenizer.json and tokenizer_config.json with the GGUF's chat template) under the
package cache, keyed by the file's identity, so every later use is a plain folder. The
weights keep the rounding of the file's quantization: fine-tuning starts from them, not
from the original model's weights, and the run record says so.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from backpropagate import log
from backpropagate.errors import InputError
from backpropagate.tiny import cache_root

SOURCE_FILE = "gguf_source.json"
# Bump when the conversion changes, so folders of an older conversion are rebuilt.
RECIPE_VERSION = 1
# Tensor types that are not a quantization (no rounding beyond the float format itself).
FLOAT_TYPES = {"F32", "F16", "BF16", "F64"}
# Vocabulary arrays: large, and not needed from the header (transformers reads them itself).
_BIG_ARRAYS = (".tokens", ".merges", ".token_type", ".scores", ".precompiled_charsmap")
_warned: set[str] = set()
HINT = (
    "Pass a complete GGUF file (as llama.cpp or Ollama store them) of an architecture "
    "transformers reads (Llama, Mistral, Qwen2/3, Phi-3, Gemma, ...)."
)


@dataclass(frozen=True)
class GgufSource:
    """What the run record and the model card say about a model that came from a GGUF.

    Attributes:
        gguf: The GGUF file the weights were dequantized from.
        quantization: Its main weight type (the most common type of its 2-D tensors, e.g. Q4_1).
        architecture: llama.cpp's architecture name (`general.architecture`).
        digest: The identity the cache folder is keyed by.
    """

    gguf: str
    quantization: str
    architecture: str
    digest: str


def is_gguf_path(name: str) -> bool:
    """Whether `name` names a GGUF file (by its suffix)."""
    return name.lower().endswith(".gguf")


def gguf_model_folder(path: Path) -> Path:
    """Returns the HF folder dequantized from GGUF file `path`, converting it on first use.

    Raises:
        InputError: INPUT_FILE_NOT_FOUND when the file is missing; INPUT_MODEL_LOAD_FAILED
            when it is not a GGUF or transformers cannot load its architecture.
    """
    path = path.expanduser().resolve()
    if not path.is_file():
        raise InputError("INPUT_FILE_NOT_FOUND", f"{path}: no such GGUF file")
    header = _read_header(path)
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", path.stem).strip("-") or "model"
    target = cache_root() / "models" / "gguf" / f"{stem}-{header['digest']}"
    if header["quantization"] not in FLOAT_TYPES and str(path) not in _warned:
        _warned.add(str(path))
        log.get_logger("gguf").warning(
            "%s holds %s-quantized weights: the dequantized model keeps that rounding, so fine-tuning "
            "starts from the quantized model, not from the original weights",
            path.name,
            header["quantization"],
        )
    if (target / SOURCE_FILE).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{stem}-", dir=target.parent))
    try:
        _convert(path, tmp, header)
        source = GgufSource(str(path), header["quantization"], header["architecture"], header["digest"])
        (tmp / SOURCE_FILE).write_text(json.dumps(asdict(source), indent=2))
        try:
            tmp.rename(target)
        except OSError:
            if not (target / SOURCE_FILE).exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def source_record(model_dir: Path) -> dict[str, Any] | None:
    """The `GgufSource` of a folder made by `gguf_model_folder`, as a dict; None for any other folder."""
    file = model_dir / SOURCE_FILE
    if not file.is_file():
        return None
    record: dict[str, Any] = json.loads(file.read_text(encoding="utf-8"))
    return record


def _read_header(path: Path) -> dict[str, Any]:
    """Architecture, main weight type, chat template, pre-tokenizer and identity of a GGUF file.

    The identity is size, modification time and a hash of the metadata and tensor table
    (everything before the tensor data): cheap for a multi-GB file, and any re-download,
    re-quantization or edit changes it.
    """
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
        fields = {name: field.contents() for name, field in reader.fields.items() if not name.endswith(_BIG_ARRAYS)}
        types = Counter(t.tensor_type.name for t in reader.tensors if len(t.shape) > 1)
        data_offset = int(reader.data_offset)
    except Exception as exc:  # a truncated or foreign file fails in many ways inside the reader
        raise InputError("INPUT_MODEL_LOAD_FAILED", f"{path}: not a readable GGUF file ({exc})", hint=HINT) from exc
    if not types:
        raise InputError("INPUT_MODEL_LOAD_FAILED", f"{path}: the GGUF holds no weight matrices", hint=HINT)
    stat = path.stat()
    digest = hashlib.blake2b(digest_size=8)
    digest.update(f"{RECIPE_VERSION}:{stat.st_size}:{stat.st_mtime_ns}:".encode())
    with open(path, "rb") as f:
        digest.update(f.read(data_offset))
    return {
        "architecture": str(fields.get("general.architecture", "")),
        "quantization": types.most_common(1)[0][0],
        "chat_template": fields.get("tokenizer.chat_template"),
        "pre": fields.get("tokenizer.ggml.pre"),
        "context_length": fields.get(f"{fields.get('general.architecture')}.context_length"),
        "digest": digest.hexdigest(),
    }


def _split_rules(pre: str | None) -> Any:
    """The HF pre-tokenizer for llama.cpp pre-tokenizer names transformers does not rebuild itself.

    `smollm` splits every digit on its own, then applies GPT-2's byte-level rules: what
    SmolLM/SmolLM2's own tokenizer.json says, and what llama.cpp does for that name.
    """
    from tokenizers import pre_tokenizers

    if pre == "smollm":
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
            ]
        )
    return None


def _convert(path: Path, out: Path, header: dict[str, Any]) -> None:
    """Dequantizes the weights into bf16 safetensors and writes the tokenizer files into `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, name = str(path.parent), path.name
    model: Any
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, dtype=torch.bfloat16, quantization_config=GgufConfig(dequantize=True)
        )
    except Exception as exc:  # unsupported architecture or tensor type: transformers says which
        raise InputError(
            "INPUT_MODEL_LOAD_FAILED",
            f"{path}: transformers cannot load this GGUF ({header['architecture'] or 'unknown'} architecture, "
            f"{header['quantization']} weights): {exc}",
            hint=HINT,
        ) from exc
    # The weights are dense now; without this, transformers refuses to save a model loaded from GGUF.
    model.hf_quantizer = None
    model.save_pretrained(out, safe_serialization=True)  # config, generation config, safetensors
    rules = _split_rules(header["pre"])
    if rules is not None:
        tokenizer.backend_tokenizer.pre_tokenizer = rules
    tokenizer.save_pretrained(out)
    _finish_tokenizer_config(out, header)


def _finish_tokenizer_config(out: Path, header: dict[str, Any]) -> None:
    """Puts the GGUF's chat template and context into tokenizer_config.json (where every reader looks)."""
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    for key in ("is_local", "local_files_only"):  # facts about this load, not about the tokenizer
        config.pop(key, None)
    (out / "chat_template.jinja").unlink(missing_ok=True)
    if header["chat_template"]:
        config["chat_template"] = header["chat_template"]
    if header["context_length"]:
        config["model_max_length"] = int(header["context_length"])
    config.setdefault("clean_up_tokenization_spaces", False)
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False))
