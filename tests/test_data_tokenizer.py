"""The fast byte-level BPE against the `tokenizers` library and llama.cpp's test vectors."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backpropagate._core import DataTokenizer
from conftest import TOKENIZERS, real_tokenizer

BYTE_LEVEL = ["llama-3.2-3b-instruct", "qwen2.5-0.5b-instruct", "smollm2-135m-instruct"]
VECTORS = TOKENIZERS / "llama.cpp-vocab"

FRAGMENTS = [
    "'s",
    "'T",
    "'re",
    "'VE",
    "'ll",
    "'d",
    "'x",
    "ſ",
    " ",
    "  ",
    "\n",
    "\r\n",
    "\n\n",
    "\t",
    "\u00a0",
    "\u3000",
    "\u2028",
    "\u0085",
    "123",
    "4567890",
    "٣٤",
    "½",
    "Ⅻ",
    "é",
    "e\u0301",
    "ß",
    "中文",
    "日本語",
    "🦙",
    "👩‍💻",
    "Hello",
    " world",
    "(x)",
    "...",
    "!?",
    "==",
    "<|im_start|>",
    "<|im_end|>",
    "<|eot_id|>",
    "<|begin_of_text|>",
    "<|endoftext|>",
    "<think>",
    "\x00",
    "\x7f",
    "\ufeff",
]

texts = st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=6)), max_size=24).map("".join)


def char_offsets(text: str, offsets: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Byte offsets (ours) as character offsets (the Python library's).

    A token holding part of a character's bytes covers that whole character there.
    """
    char_of = []
    for i, ch in enumerate(text):
        char_of.extend([i] * len(ch.encode()))
    return [(char_of[s], char_of[e - 1] + 1) for s, e in offsets]


_PAIRS: dict[str, tuple[DataTokenizer, object]] = {}


def load_pairs() -> dict[str, tuple[DataTokenizer, object]]:
    """Our tokenizer and the library's as transformers builds it, per real byte-level tokenizer (loaded once).

    transformers' tokenizer class may replace parts of tokenizer.json (SmolLM2's `GPT2Tokenizer`
    drops the single-digit split), so the reference is its backend, not the raw file.
    """
    from transformers import AutoTokenizer

    if not _PAIRS:
        for name in BYTE_LEVEL:
            folder = real_tokenizer(name)
            _PAIRS[name] = (DataTokenizer(str(folder)), AutoTokenizer.from_pretrained(folder).backend_tokenizer)
    return _PAIRS


@pytest.fixture
def pairs():
    return load_pairs()


@pytest.mark.parametrize("name", BYTE_LEVEL)
def test_real_byte_level_tokenizers_take_the_fast_path(pairs, name):
    assert pairs[name][0].fast_bpe


@settings(max_examples=300, deadline=None)
@given(text=texts)
def test_fast_bpe_matches_tokenizers_library(text):
    for name, (ours, ref) in load_pairs().items():
        ids, offsets = ours.encode(text)
        enc = ref.encode(text, add_special_tokens=False)
        assert ids == enc.ids, name
        assert char_offsets(text, offsets) == enc.offsets, name


def test_fast_bpe_on_long_runs_and_corpus_like_text(pairs):
    samples = [
        "=" * 3000,
        " " * 1000 + "x",
        "a" * 5000,
        "\n" * 300,
        "1234567890" * 200,
        "The quick brown fox jumps over the lazy dog. " * 50,
        "Ünïcödé wörds and ∑ symbols ≈ everywhere " * 30,
    ]
    for name, (ours, ref) in pairs.items():
        for text in samples:
            assert ours.encode(text)[0] == ref.encode(text, add_special_tokens=False).ids, name


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_qwen2"])
def test_tiny_models_take_the_fast_path_and_agree(name, request):
    from tokenizers import Tokenizer

    folder = request.getfixturevalue(name)
    ours = DataTokenizer(str(folder))
    ref = Tokenizer.from_file(str(folder / "tokenizer.json"))
    assert ours.fast_bpe
    for text in ["What is 4 times 3?", "<|im_start|>user\nhi<|im_end|>", "  x\n\n\ty 12345 'll"]:
        assert ours.encode(text)[0] == ref.encode(text, add_special_tokens=False).ids


def test_fast_and_general_paths_agree(pairs):
    folder = real_tokenizer("llama-3.2-3b-instruct")
    slow = DataTokenizer(str(folder), fast=False)
    assert not slow.fast_bpe
    fast = pairs["llama-3.2-3b-instruct"][0]
    text = "<|start_header_id|>user<|end_header_id|>\n\nHi! I'm   testing 12345 things\n"
    assert fast.encode(text) == slow.encode(text)


def read_vectors(name: str) -> list[tuple[str, list[int]]]:
    inp = (VECTORS / f"ggml-vocab-{name}.gguf.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    out = (VECTORS / f"ggml-vocab-{name}.gguf.out").read_text().split("\n")
    return [(text, [int(x) for x in ids.split()]) for text, ids in zip(inp, out, strict=False)]


def test_llama_cpp_vectors_qwen2():
    if not (VECTORS / "ggml-vocab-qwen2.gguf.inp").exists():
        pytest.skip("llama.cpp vectors not available")
    tok = DataTokenizer(str(real_tokenizer("qwen2.5-0.5b-instruct")))
    vectors = read_vectors("qwen2")
    assert len(vectors) > 40
    for text, ids in vectors:
        assert tok.encode(text)[0] == ids, repr(text)


def test_llama_cpp_vectors_phi3_follow_transformers():
    """Phi-3 is SentencePiece: the general path, loaded the way transformers loads it.

    llama.cpp's vectors record the tokenizer.json as written (a prefix space on every
    text, the `legacy` behaviour); for this folder without config.json, transformers 5
    builds a `LlamaTokenizer` with `legacy=False` from tokenizer_config.json, which differs
    only on leading spaces. Training must match what transformers feeds the model, so we
    follow it. (With config.json's `model_type: phi3`, transformers keeps tokenizer.json as
    written, and so do we: see test_families.py.)
    """
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    if not (VECTORS / "ggml-vocab-phi-3.gguf.inp").exists():
        pytest.skip("llama.cpp vectors not available")
    folder = real_tokenizer("phi-3-mini")
    ours = DataTokenizer(str(folder))
    hf = AutoTokenizer.from_pretrained(folder)
    raw = Tokenizer.from_file(str(folder / "tokenizer.json"))
    for text, ids in read_vectors("phi-3"):
        assert raw.encode(text, add_special_tokens=False).ids == ids, repr(text)
        assert ours.encode(text)[0] == hf(text, add_special_tokens=False)["input_ids"], repr(text)


def test_unknown_folder_is_a_tokenizer_error(tmp_path: Path):
    from backpropagate.errors import InputError

    with pytest.raises(InputError) as err:
        DataTokenizer(str(tmp_path))
    assert err.value.code == "INPUT_TOKENIZER_LOAD_FAILED"
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(InputError) as err:
        DataTokenizer(str(tmp_path))
    assert err.value.code == "INPUT_TOKENIZER_LOAD_FAILED"


def test_byte_level_tokenizer_declared_as_llama_class_keeps_its_pipeline(tmp_path):
    """Llama 3 derivatives often name `LlamaTokenizerFast`; transformers then keeps the byte-level file."""
    import json
    import shutil

    from transformers import AutoTokenizer

    folder = tmp_path / "llama3-declared-llama"
    shutil.copytree(real_tokenizer("llama-3.2-3b-instruct"), folder)
    folder.chmod(0o755)
    config_path = folder / "tokenizer_config.json"
    config_path.chmod(0o644)
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "LlamaTokenizerFast"
    config_path.write_text(json.dumps(config))
    ours = DataTokenizer(str(folder))
    assert ours.fast_bpe
    text = "Hello world, this is a test of 12345 things."
    assert ours.encode(text)[0] == AutoTokenizer.from_pretrained(folder)(text, add_special_tokens=False)["input_ids"]


def test_every_character_below_u3000_in_context(pairs):
    """Character classes (letters, numbers, whitespace kinds) decide the splits: sweep them all."""
    chars = [chr(cp) for cp in range(0x3001) if not 0xD800 <= cp <= 0xDFFF]
    for name, (ours, ref) in pairs.items():
        for c in chars:
            text = f"a{c}b {c}{c} x\n{c}1"
            assert ours.encode(text)[0] == ref.encode(text, add_special_tokens=False).ids, (name, hex(ord(c)))
