"""What a killed export or training save leaves behind (hidden `.<name>.<pid>.tmp` files and
folders, or the output it was replacing) is cleared on the next start: only those exact
names of processes that are gone, never a file of the user's or of a running export."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cli_helpers import run_cli
from test_export import RUN_RECORD, make_adapter


def dead_pid() -> int:
    """The id of a process that has exited."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture
def live_pid() -> Iterator[int]:
    """The id of another process that is still running."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc.pid
    proc.kill()
    proc.wait()


def test_kill_mid_merged_export_then_export_again(tmp_path: Path) -> None:
    """SIGKILL while a real merged export runs: its hidden folder is left, the next export removes it."""
    from backpropagate.export import export
    from backpropagate.tiny import ensure_tiny_model
    from export_models import build_model

    model = build_model("qwen2", tmp_path / "big", hidden=512, layers=4, tokenizer_dir=ensure_tiny_model("tiny-qwen2"))
    out = tmp_path / "merged"
    code = f"from backpropagate.export import export; export({str(model)!r}, 'merged', output={str(out)!r})"
    proc = subprocess.Popen([sys.executable, "-c", code])
    leftover = tmp_path / f".merged.{proc.pid}.tmp"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not leftover.is_dir() and proc.poll() is None:
        time.sleep(0.01)
    if proc.poll() is not None:
        pytest.skip("the export finished before it could be interrupted")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert leftover.is_dir() and not out.exists()

    result = export(model, "merged", output=out)
    assert not leftover.exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= {p.name for p in result.files}


def test_gguf_export_clears_its_own_leftovers_only(tiny_llama: Path, tmp_path: Path, live_pid: int) -> None:
    """The exact names a killed GGUF export leaves beside its file (0-byte loss.png copy included)."""
    from backpropagate.export import export

    adapter = make_adapter(tiny_llama, tmp_path / "adapter", "tiny-llama")
    (adapter / "backpropagate_run.json").write_text(json.dumps({**RUN_RECORD, "loss_curve": "loss.png"}))
    (adapter / "loss.png").write_bytes(b"\x89PNG plot bytes")
    out = tmp_path / "out"
    out.mkdir()
    gone = dead_pid()
    ours = [
        f".loss.png.{gone}.tmp",
        f".README.md.{gone}.tmp",
        f".Modelfile.{gone}.tmp",
        f".tiny-llama-f16.gguf.{gone}.tmp",
        f".tiny-llama-f16.gguf.source.json.{gone}.tmp",
    ]
    for name in ours:
        (out / name).write_bytes(b"")
    kept = [f".loss.png.{live_pid}.tmp", ".loss.png.notes.tmp", "loss.png.tmp", "notes.tmp", f".other.{gone}.tmp"]
    for name in kept:
        (out / name).write_text("the user's")

    result = export(adapter, "gguf", output=out, quantization="f16")
    names = {p.name for p in out.iterdir()}
    assert not names & set(ours)
    assert set(kept) <= names and all((out / k).read_text() == "the user's" for k in kept)
    assert (out / "loss.png").read_bytes() == b"\x89PNG plot bytes"
    assert result.path.read_bytes()[:4] == b"GGUF" and "run-2026-abc" in (out / "README.md").read_text()


def test_train_start_clears_a_killed_final_save(tmp_path: Path) -> None:
    """Leftovers of a run killed while saving its adapter and plot are removed when the next run starts."""
    out = tmp_path / "run"
    out.mkdir()
    gone = dead_pid()
    (out / f".adapter.{gone}.tmp").mkdir()
    (out / f".adapter.{gone}.tmp" / "adapter_model.safetensors").write_bytes(b"half")
    (out / f".loss.png.{gone}.tmp").write_bytes(b"")
    r = run_cli("train", "--model", "tiny-llama", "--steps", "1", "--output", str(out))
    assert r.status == 0, r.stderr
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
    assert (out / "adapter" / "adapter_model.safetensors").stat().st_size > 1000
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_adapter_being_replaced_when_killed_is_put_back(tmp_path: Path) -> None:
    """Killed between moving the old adapter aside and renaming the new one in: the old one comes back."""
    first = tmp_path / "first"
    assert run_cli("train", "--model", "tiny-llama", "--steps", "1", "--output", str(first)).status == 0
    out = tmp_path / "run"
    out.mkdir()
    aside = out / f".adapter.{dead_pid()}.old"
    (first / "adapter").rename(aside)
    r = run_cli("train", "--model", "tiny-llama", "--steps", "1", "--output", str(out))
    assert r.status == 6 and "[STATE_OUTPUT_EXISTS]" in r.stderr  # the finished adapter is the user's again
    assert not aside.exists() and (out / "adapter" / "adapter_model.safetensors").is_file()
