"""GGUF export checked by llama.cpp itself: for every supported architecture, a tiny
random model exported by the Rust writer loads in llama.cpp, tokenizes like
transformers, renders the chat template like transformers, and predicts the same top-5
next tokens with close log-probabilities."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from export_models import FAMILIES, build_model

pytest.importorskip("xllamacpp")

PROMPT = "The quick brown fox jumps over the lazy dog. Hello, world! 12345"
CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "Another one?"},
]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {f: build_model(f, root / f) for f in FAMILIES}


def _hf_top5(model_dir: Path, text: str) -> tuple[list[int], np.ndarray, list[int]]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok(text)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1].double()
    logp = torch.log_softmax(logits, -1)
    top = torch.topk(logp, 5)
    return top.indices.tolist(), top.values.numpy(), ids


def assert_top5_like_transformers(gguf: Path, model_dir: Path, text: str = PROMPT) -> Any:
    """llama.cpp on `gguf` tokenizes `text` as transformers does on `model_dir` and predicts its next-token top-5.

    Returns the loaded llama.cpp model for further checks.
    """
    from backpropagate.generate import GGUFModel

    want_ids, want_logp, hf_ids = _hf_top5(model_dir, text)
    llm = GGUFModel(gguf, n_ctx=256)
    assert llm.tokenize(text) == hf_ids
    top = llm.top_logprobs(text, 5)
    assert [t for t, _ in top] == want_ids
    np.testing.assert_allclose([lp for _, lp in top], want_logp, atol=1e-2)
    return llm


@pytest.mark.parametrize("family", list(FAMILIES))
def test_llama_cpp_matches_transformers(family: str, models: dict[str, Path], tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from backpropagate import _core

    model_dir = models[family]
    gguf = tmp_path / f"{family}.gguf"
    _core.convert_to_gguf(str(model_dir), str(gguf), "f32")
    llm = assert_top5_like_transformers(gguf, model_dir)

    tok = AutoTokenizer.from_pretrained(model_dir)
    messages = CONVERSATION if family != "mistral" else CONVERSATION[1:]
    if tok.chat_template:
        expected = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        rendered = llm.apply_template(messages)
        # llama.cpp adds BOS when tokenizing, so it drops a leading BOS from the rendered text.
        bos = tok.bos_token or ""
        assert rendered in (expected, expected[len(bos) :] if bos and expected.startswith(bos) else expected)


def test_rope_freqs_and_pre_tokenizer_names(tiny_llama: Path, tmp_path: Path) -> None:
    """Llama 3.1 rope scaling adds rope_freqs; the pre-tokenizer name follows the split rules
    (a locally trained tokenizer with Llama 3's rules gets llama-bpe / smaug-bpe)."""
    from gguf import GGUFReader

    from backpropagate import _core

    llama = build_model("llama", tmp_path / "llama", tokenizer_dir=tiny_llama)
    out = tmp_path / "l.gguf"
    _core.convert_to_gguf(str(llama), str(out), "bf16")
    reader = GGUFReader(out)
    names = {t.name: t for t in reader.tensors}
    rope = names["rope_freqs.weight"]
    assert rope.tensor_type.name == "F32" and len(rope.data) == 16 // 2
    assert float(rope.data[0]) == 1.0 and float(rope.data[-1]) == 32.0
    assert reader.fields["tokenizer.ggml.pre"].contents() == "llama-bpe"
    smol = build_model("smollm3", tmp_path / "smol", tokenizer_dir=tiny_llama, pad_token_id=None)
    _core.convert_to_gguf(str(smol), str(tmp_path / "s.gguf"), "bf16")
    assert GGUFReader(tmp_path / "s.gguf").fields["tokenizer.ggml.pre"].contents() == "smaug-bpe"


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
def test_builtin_tiny_models_export_and_generate(name: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    from backpropagate import _core

    model_dir = request.getfixturevalue(name.replace("-", "_"))
    out = tmp_path / f"{name}.gguf"
    _core.convert_to_gguf(str(model_dir), str(out), "f32")
    assert_top5_like_transformers(out, model_dir)
