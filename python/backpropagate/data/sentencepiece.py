"""A tokenizer.json for model folders that ship only a SentencePiece `tokenizer.model`.

Older Llama and Mistral repositories hold no tokenizer.json; transformers converts their
`tokenizer.model` when it loads them. The engine reads tokenizer.json only, so the
conversion is done once here, through transformers itself (so the result is the tokenizer
transformers trains with), and cached under the package cache keyed by the files it
depends on.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from backpropagate.errors import InputError
from backpropagate.log import get_logger
from backpropagate.tiny import cache_root

log = get_logger(__name__)

# The conversion depends on these files (legacy / add_prefix_space, the model type);
# they are copied beside the result, so it is a complete tokenizer folder.
INPUTS = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "config.json")


def tokenizer_folder(model_dir: Path) -> Path:
    """A folder holding `model_dir`'s tokenizer files with a tokenizer.json: the model's own, or the converted one.

    The GGUF export reads its vocabulary (with SentencePiece scores) from here, as the
    data engine reads its tokenizer.

    Raises:
        InputError: INPUT_TOKENIZER_LOAD_FAILED when the folder has neither tokenizer.json
            nor tokenizer.model, or the conversion fails.
    """
    if (model_dir / "tokenizer.json").is_file():
        return model_dir
    if not (model_dir / "tokenizer.model").is_file():
        raise InputError(
            "INPUT_TOKENIZER_LOAD_FAILED", f"{model_dir}: no tokenizer.json or tokenizer.model in this model folder"
        )
    folder = cache_root() / "tokenizers" / _key(model_dir)
    if not (folder / "tokenizer.json").is_file():
        _convert(model_dir, folder)
    return folder


def tokenizer_json_of(model_dir: Path) -> Path:
    """The tokenizer.json the engine reads for `model_dir` (see `tokenizer_folder`)."""
    return tokenizer_folder(model_dir) / "tokenizer.json"


def _key(model_dir: Path) -> str:
    import transformers

    digest = hashlib.sha256(transformers.__version__.encode())
    for name in INPUTS:
        path = model_dir / name
        digest.update(name.encode())
        digest.update(path.read_bytes() if path.is_file() else b"-")
    return digest.hexdigest()[:32]


def _convert(model_dir: Path, folder: Path) -> None:
    """Loads `model_dir` with transformers (which converts tokenizer.model) and saves its tokenizer.json.

    The side files are copied first and tokenizer.json renamed into place last, so a
    folder with a tokenizer.json is complete.
    """
    from transformers import AutoTokenizer

    log.info("converting %s/tokenizer.model to tokenizer.json (once; cached in %s)", model_dir, folder)
    try:
        backend = AutoTokenizer.from_pretrained(model_dir).backend_tokenizer
    except Exception as exc:  # transformers raises many types for a bad SentencePiece file
        raise InputError(
            "INPUT_TOKENIZER_LOAD_FAILED", f"{model_dir}/tokenizer.model: cannot be converted ({exc})"
        ) from exc
    folder.mkdir(parents=True, exist_ok=True)
    for name in INPUTS:
        if (model_dir / name).is_file():
            shutil.copyfile(model_dir / name, folder / name)
    partial = folder / f".tokenizer.json.{os.getpid()}"
    backend.save(str(partial))
    os.replace(partial, folder / "tokenizer.json")
