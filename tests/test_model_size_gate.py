"""`mode="full"` on a model too big for it is refused from config.json alone, before any
weights are fetched: for a local folder holding no weights at all, and for a hub id,
through the real `huggingface_hub` client reading a hand-built offline cache whose
listing names weight files that are not there (asking for them fails)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

# Llama-2-7B's shape: about 6.7B parameters.
CONFIG_7B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
    "torch_dtype": "float16",
}
REPO = "acme/big-7b"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
WEIGHTS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")


def write_config_folder(folder: Path, tiny_llama: Path) -> Path:
    """config.json of a 7B model, the tokenizer files and the safetensors index: no weights."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(CONFIG_7B))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).write_bytes((tiny_llama / name).read_bytes())
    index = {"metadata": {"total_size": 13_476_839_424}, "weight_map": {"lm_head.weight": WEIGHTS[1]}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


@pytest.fixture
def hub_cache(tmp_path: Path, tiny_llama: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An offline hub cache (`models--acme--big-7b/refs/main`, `snapshots/<commit>/`, the
    tree listing) in which the repo's weight files are listed but not downloaded."""
    from huggingface_hub import constants
    from huggingface_hub._tree_cache import TreeCacheEntry, write_tree_cache

    storage = tmp_path / "hub" / "models--acme--big-7b"
    snapshot = write_config_folder(storage / "snapshots" / COMMIT, tiny_llama)
    (storage / "refs").mkdir()
    (storage / "refs" / "main").write_text(COMMIT)
    listing = {
        p.name: TreeCacheEntry(size=p.stat().st_size, blob_id=f"{i:040x}") for i, p in enumerate(snapshot.iterdir())
    }
    listing |= {name: TreeCacheEntry(size=6_738_419_712, blob_id=f"{9 + i:040x}") for i, name in enumerate(WEIGHTS)}
    write_tree_cache(str(storage), COMMIT, listing)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return snapshot


def test_local_config_without_weights_is_refused_at_trainer(tmp_path: Path, tiny_llama: Path) -> None:
    from backpropagate import Trainer
    from backpropagate.errors import RunFailedError

    folder = write_config_folder(tmp_path / "big-7b", tiny_llama)
    with pytest.raises(RunFailedError) as err:
        Trainer(folder, mode="full")
    assert err.value.code == "RUNTIME_FULL_FT_MODEL_TOO_LARGE" and "6.7B parameters" in err.value.message


def test_full_fine_tuning_sharded_over_devices_is_sized_per_device(tmp_path: Path, tiny_llama: Path) -> None:
    from backpropagate import Trainer
    from backpropagate.errors import RunFailedError

    folder = write_config_folder(tmp_path / "big-7b", tiny_llama)
    Trainer(folder, mode="full", gpus=2, fsdp=True)  # 6.7B over two devices: 3.4B each
    with pytest.raises(RunFailedError) as err:
        Trainer(folder, mode="full", gpus=2)  # every device would hold the whole model
    assert "stops at 4.5B (4.5B per device, sharded with --gpus N --fsdp)" in err.value.message


def test_hub_model_is_sized_from_its_config_before_weights(hub_cache: Path) -> None:
    from backpropagate import Trainer
    from backpropagate.errors import RunFailedError

    with pytest.raises(RunFailedError) as err:
        Trainer(REPO, mode="full")
    assert err.value.code == "RUNTIME_FULL_FT_MODEL_TOO_LARGE" and "6.7B parameters" in err.value.message
    assert not list(hub_cache.glob("*.safetensors"))


def test_config_fetch_leaves_weights_out_and_weight_fetch_asks_for_them(hub_cache: Path) -> None:
    from backpropagate.errors import ConfigError
    from backpropagate.model_source import resolve_model

    assert resolve_model(REPO, weights=False) == hub_cache
    # The cache's listing names the weights: asking for them offline, without them there, fails.
    with pytest.raises(ConfigError) as err:
        resolve_model(REPO)
    assert err.value.code == "CONFIG_UNKNOWN_MODEL" and WEIGHTS[0] in err.value.message
