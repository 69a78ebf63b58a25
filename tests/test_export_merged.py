"""Merged export streams the base tensor by tensor and writes PEFT's exact bytes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from export_models import build_model
from test_export import make_adapter


def _peft_state(base: Path, adapter: Path) -> dict:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    return PeftModel.from_pretrained(model, adapter).merge_and_unload().state_dict()


def _saved_state(folder: Path) -> dict:
    from safetensors.torch import load_file

    state: dict = {}
    for f in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(f)))
    return state


@pytest.fixture(scope="module")
def untied_llama(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path) -> Path:
    return build_model(
        "llama", tmp_path_factory.mktemp("untied") / "m", tokenizer_dir=tiny_llama, tie_word_embeddings=False
    )


@pytest.mark.parametrize(
    "variant",
    [{}, {"use_rslora": True}, {"use_dora": True}, {"modules_to_save": ["lm_head"]}, {"alpha_pattern": {"v_proj": 2}}],
    ids=["lora", "rslora", "dora", "modules_to_save", "alpha_pattern"],
)
def test_streamed_merge_is_byte_identical_to_peft(variant: dict, untied_llama: Path, tmp_path: Path) -> None:
    import torch

    from backpropagate.export import export

    adapter = make_adapter(untied_llama, tmp_path / "adapter", str(untied_llama), **variant)
    result = export(adapter, "merged", output=tmp_path / "merged")
    ours, ref = _saved_state(result.path), _peft_state(untied_llama, adapter)
    assert ours.keys() == ref.keys()
    for name, t in ref.items():
        assert ours[name].dtype == torch.bfloat16
        assert torch.equal(ours[name], t), name
    assert json.loads((result.path / "config.json").read_text())["dtype"] == "bfloat16"


def test_shards_with_index_load_in_transformers(
    untied_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from backpropagate.export import export, merged

    adapter = make_adapter(untied_llama, tmp_path / "adapter", str(untied_llama), use_dora=True)
    monkeypatch.setattr(merged, "MAX_SHARD_BYTES", 20_000)
    result = export(adapter, "merged", output=tmp_path / "merged")
    shards = sorted(p.name for p in result.path.glob("*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((result.path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    model = AutoModelForCausalLM.from_pretrained(result.path)
    ref = _peft_state(untied_llama, adapter)
    for name, t in model.state_dict().items():
        assert torch.equal(t, ref[name]), name


def test_embedding_lora_merges_through_peft(tiny_llama: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import torch

    from backpropagate.export import export

    adapter = make_adapter(tiny_llama, tmp_path / "adapter", "tiny-llama", target_modules=["embed_tokens", "q_proj"])
    result = export(adapter, "merged", output=tmp_path / "merged")
    assert "merging through PEFT" in caplog.text and "embedding LoRA" in caplog.text
    ref = _peft_state(tiny_llama, adapter)
    ours = _saved_state(result.path)
    for name in ours:
        assert torch.equal(ours[name], ref[name]), name
