"""Outputs get the modes the user's umask gives any new file (0644 / 0755 under umask 022),
not the private 0600 / 0700 of the temporary files and folders they were built in."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from cli_helpers import run_cli


@pytest.fixture(params=[0o022, 0o027])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def modes(root: Path) -> dict[str, tuple[int, bool]]:
    """(permission bits, is a folder) of `root` and everything under it, by path from `root`'s parent."""
    paths = [root, *root.rglob("*")]
    return {str(p.relative_to(root.parent)): (stat.S_IMODE(p.stat().st_mode), p.is_dir()) for p in paths}


def test_outputs_follow_the_umask(umask: int, tmp_path: Path) -> None:
    from backpropagate.export import export

    run = tmp_path / "run"
    r = run_cli("train", "--model", "tiny-llama", "--steps", "1", "--output", str(run))
    assert r.status == 0, r.stderr
    adapter = run / "adapter"
    merged = export(adapter, "merged", output=tmp_path / "merged")
    lora = export(adapter, "lora", output=tmp_path / "lora")
    gguf = export(adapter, "gguf", output=tmp_path / "gguf", quantization="f16")

    checkpoint = next((run / "checkpoints").iterdir())
    found: dict[str, tuple[int, bool]] = {}
    for root in (adapter, checkpoint, merged.path, lora.path, gguf.path.parent):
        found |= modes(root)
    assert "adapter/adapter_model.safetensors" in found and "merged/model.safetensors" in found
    assert f"gguf/{gguf.path.name}" in found and f"{checkpoint.name}/trainable.safetensors" in found
    file_mode, dir_mode = 0o666 & ~umask, 0o777 & ~umask
    wrong = {path: oct(mode) for path, (mode, is_dir) in found.items() if mode != (dir_mode if is_dir else file_mode)}
    assert not wrong, f"expected {oct(file_mode)} files and {oct(dir_mode)} folders"
