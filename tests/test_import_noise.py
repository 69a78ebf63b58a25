"""Nothing 4-bit runs in `backprop info` or a CPU LoRA run, so bitsandbytes (imported in
passing by peft) must not print its kernel warning there: checked on the real command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

NOISE = ("gemm_4bit_forward", "trust_remote_code", "kernels-community")


def backprop(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    code = "import sys; from backpropagate.cli import main; main(sys.argv[1:])"
    return subprocess.run(
        [sys.executable, "-c", code, *args], cwd=cwd, capture_output=True, text=True, timeout=300, check=False
    )


@pytest.mark.parametrize(
    "args",
    [("info",), ("train", "--model", "tiny-llama", "--steps", "1", "--device", "cpu", "--output", "run")],
    ids=["info", "train"],
)
def test_no_bitsandbytes_warning(args: tuple[str, ...], tmp_path: Path, tiny_llama: Path) -> None:
    done = backprop(*args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert not [word for word in NOISE if word in done.stderr], done.stderr
    if args[0] == "train":
        assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").exists()
