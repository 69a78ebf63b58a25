"""Model folders with only a SentencePiece `tokenizer.model` (older Llama and Mistral repos).

transformers converts such a file when it loads the folder; we convert it once through
transformers, cache the tokenizer.json, and tokenize, train and export from it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from backpropagate._core import DataTokenizer
from backpropagate.data import DataConfig, prepare
from backpropagate.data.sentencepiece import tokenizer_folder, tokenizer_json_of
from backpropagate.errors import InputError
from test_families import TEXTS

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! How are you today? I am fine, thank you.",
    "def add(a, b):\n    return a + b\n",
    "Numbers like 12345 and 3.14159 appear in text.",
    "Unicode: café, naïve, Zürich, 東京, Москва.",
] * 40
TEMPLATE = "{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"


@pytest.fixture(scope="module")
def spm_folder(tmp_path_factory) -> Path:
    """A Llama-style folder with a freshly trained SentencePiece BPE model (byte fallback) and no tokenizer.json."""
    import sentencepiece as spm

    folder = tmp_path_factory.mktemp("spm-llama")
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(CORPUS))
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(folder / "tokenizer"),
        vocab_size=400,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    corpus.unlink()
    (folder / "tokenizer.vocab").unlink()
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "LlamaTokenizer",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "add_bos_token": True,
                "add_eos_token": False,
                "legacy": False,
                "chat_template": TEMPLATE,
            }
        )
    )
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 400}))
    return folder


def test_converted_once_and_tokenizes_as_transformers(spm_folder):
    from transformers import AutoTokenizer

    converted = tokenizer_json_of(spm_folder)
    assert converted.is_file() and not (spm_folder / "tokenizer.json").exists()
    stamp = converted.stat().st_mtime_ns
    assert tokenizer_json_of(spm_folder) == converted
    assert converted.stat().st_mtime_ns == stamp  # cached, not converted again
    hf = AutoTokenizer.from_pretrained(spm_folder)
    ours = DataTokenizer(str(spm_folder), tokenizer_json=str(converted))
    for text in TEXTS + CORPUS[:5]:
        assert ours.encode(text)[0] == hf(text, add_special_tokens=False)["input_ids"], text


def test_prepare_reads_a_sentencepiece_only_folder(spm_folder, tmp_path):
    from transformers import AutoTokenizer

    messages = [{"role": "user", "content": "Hello world"}, {"role": "assistant", "content": "I am fine."}]
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": messages}) + "\n")
    ds = prepare(data, spm_folder, DataConfig(cache=False))
    hf = AutoTokenizer.from_pretrained(spm_folder)
    assert ds.input_ids.tolist() == hf.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]


def test_gguf_export_writes_the_vocabulary_with_scores(spm_folder, tmp_path):
    """Exported from a tokenizer.model-only model, the GGUF holds the SentencePiece vocabulary with scores."""
    from gguf import GGUFReader

    from backpropagate import _core
    from backpropagate.export.source import ExportSource
    from export_models import build_model

    model = build_model("llama", tmp_path / "model", tokenizer_dir=spm_folder)
    assert not (model / "tokenizer.json").exists()
    source = ExportSource(path=model, model_dir=model, adapter_dir=None, base_model="spm-llama")
    assert (source.tokenizer_dir / "tokenizer.json").is_file()
    out = tmp_path / "m.gguf"
    _core.convert_to_gguf(str(model), str(out), "f32", tokenizer_dir=str(source.tokenizer_dir))
    fields = GGUFReader(out).fields
    assert fields["tokenizer.ggml.model"].contents() == "llama"
    tokens = fields["tokenizer.ggml.tokens"].contents()
    scores = fields["tokenizer.ggml.scores"].contents()
    converted = json.loads((source.tokenizer_dir / "tokenizer.json").read_text())["model"]
    assert tokens[:400] == sorted(converted["vocab"], key=converted["vocab"].get)
    assert len(scores) == len(tokens)
    # A token made by merge k scores -k, so llama.cpp merges in the tokenizer's rank order.
    merges = [m.split(" ") if isinstance(m, str) else m for m in converted["merges"]]
    first_rank: dict[str, int] = {}
    for rank, (a, b) in enumerate(merges):
        first_rank.setdefault(a + b, rank)
    assert len(first_rank) > 50
    for token, rank in first_rank.items():
        assert scores[converted["vocab"][token]] == -rank, token


def test_folder_without_any_tokenizer_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(InputError) as err:
        tokenizer_folder(tmp_path)
    assert err.value.code == "INPUT_TOKENIZER_LOAD_FAILED"
