"""Shared fixtures: an isolated cache home, the built-in tiny models, real tokenizers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("BACKPROPAGATE_SHARED", REPO.parent / "shared"))
TOKENIZERS = SHARED / "tokenizers"

os.environ.setdefault("MLX_DISABLE_COMPILE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session", autouse=True)
def _isolated_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """All caches of the test session go to one temporary folder."""
    home = tmp_path_factory.mktemp("bp-home")
    os.environ["BACKPROPAGATE_HOME"] = str(home)
    return home


@pytest.fixture(scope="session")
def tiny_llama(_isolated_home: Path) -> Path:
    from backpropagate.tiny import ensure_tiny_model

    return ensure_tiny_model("tiny-llama")


@pytest.fixture(scope="session")
def tiny_qwen2(_isolated_home: Path) -> Path:
    from backpropagate.tiny import ensure_tiny_model

    return ensure_tiny_model("tiny-qwen2")


def real_tokenizer(name: str) -> Path:
    """Folder of a real model's tokenizer files in shared/ or from a package (`packaged_tokenizers`), or skip."""
    from packaged_tokenizers import BUILT_FOLDERS, PACKAGED, packaged_folder

    if name in BUILT_FOLDERS:
        return BUILT_FOLDERS[name]()
    if any(key.startswith(f"{name}/") for key in PACKAGED):
        return packaged_folder(name)
    path = TOKENIZERS / name
    if not (path / "tokenizer.json").exists():
        pytest.skip(f"shared tokenizer {name} not available")
    return path


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `gpu` skip where no CUDA device is present."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
