"""Phi-4-mini to GGUF from its config.json as published: `partial_rotary_factor` and the long-rope
factors at the top level (transformers 5 files them under `rope_parameters`), tied embeddings.
llama.cpp must rotate 3/4 of each head, so `phi3.rope.dimension_count` is what decides parity,
and must split text by o200k_base's rule (its `gpt-4o` pre-tokenizer) to see the same tokens."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from export_models import build_model
from packaged_tokenizers import LLAMA_CPP_CHECK_TEXT, O200K_CHECK_HASH
from test_export_gguf import assert_top5_like_transformers
from test_families import TEXTS, family_folder

pytest.importorskip("xllamacpp")


def published_form(folder: Path) -> dict:
    """Rewrites the saved config.json the way Phi-4-mini-instruct's own is written."""
    config = json.loads((folder / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config.update(
        rope_theta=rope["rope_theta"],
        partial_rotary_factor=rope["partial_rotary_factor"],
        original_max_position_embeddings=rope["original_max_position_embeddings"],
        rope_scaling={"type": "longrope", "short_factor": rope["short_factor"], "long_factor": rope["long_factor"]},
    )
    (folder / "config.json").write_text(json.dumps(config))
    return config


@pytest.mark.parametrize("form", ["transformers", "published"])
def test_llama_cpp_matches_transformers(form: str, tmp_path: Path) -> None:
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    from backpropagate import _core

    folder = build_model("phi4-mini", tmp_path / "phi4-mini")
    if form == "published":
        assert "rope_parameters" not in published_form(folder)
    out = tmp_path / "phi4-mini.gguf"
    _core.convert_to_gguf(str(folder), str(out), "f32")
    reader = GGUFReader(out)
    assert reader.fields["phi3.rope.dimension_count"].contents() == 12  # 0.75 * head_dim 16
    names = {t.name for t in reader.tensors}
    assert "output.weight" not in names and "rope_factors_short.weight" in names
    assert reader.fields["tokenizer.ggml.pre"].contents() == "gpt-4o"
    llm = assert_top5_like_transformers(out, folder)
    tok = AutoTokenizer.from_pretrained(folder)
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "Hi 12345!"}], tokenize=False, add_generation_prompt=True
    )
    for text in [*TEXTS, chat]:
        assert llm.tokenize(text) == tok(text)["input_ids"], text
    # llama.cpp's `gpt-4o` split ends a word before a nonspacing mark that o200k_base keeps in it
    # (Khmer "ាន់" gives "ាន" + "់"): on its own check text that is where the two differ.
    khmer = "កាន់តែពិសេសអាច"
    assert khmer in LLAMA_CPP_CHECK_TEXT
    without_khmer = LLAMA_CPP_CHECK_TEXT.replace(khmer, "")
    assert llm.tokenize(without_khmer) == tok(without_khmer)["input_ids"]


def test_engine_and_transformers_give_the_published_o200k_ids(tmp_path: Path) -> None:
    """Both give, on llama.cpp's check text, the ids its record of the published o200k_base tokenizer hashes to."""
    from transformers import AutoTokenizer

    from backpropagate._core import DataTokenizer

    folder = family_folder("phi4-mini", tmp_path)
    hf = AutoTokenizer.from_pretrained(folder)
    ours = DataTokenizer(str(folder))
    assert [hf.convert_tokens_to_ids(t) for t in ("<|assistant|>", "<|end|>", "<|user|>")] == [200019, 200020, 200021]
    for ids in (ours.encode(LLAMA_CPP_CHECK_TEXT)[0], hf(LLAMA_CPP_CHECK_TEXT, add_special_tokens=False)["input_ids"]):
        assert hashlib.sha256(str(list(ids)).encode()).hexdigest() == O200K_CHECK_HASH
