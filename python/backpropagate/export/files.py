"""Outputs that appear under their final name only when complete.

A folder export is built in a hidden temporary folder beside the target, every file is
fsynced, and the folder is renamed into place; a failure or a kill leaves at most a
hidden `.tmp` folder, never a half-written export under the final name.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from backpropagate.errors import StateError


def check_free(path: Path, force: bool) -> None:
    """Raises STATE_OUTPUT_EXISTS when `path` exists and `force` is off."""
    if path.exists() and not force:
        raise StateError("STATE_OUTPUT_EXISTS", f"{path}: already exists")


def fsync_tree(root: Path) -> None:
    """Flushes every file under `root` (and the folders) to disk."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        fd = os.open(dirpath, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_dir(target: Path, force: bool) -> Iterator[Path]:
    """Yields a temporary folder that becomes `target` when the block succeeds."""
    check_free(target, force)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        fsync_tree(tmp)
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            target.rename(old)
            tmp.rename(target)
            if old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink()
        else:
            tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_text_atomic(path: Path, text: str) -> None:
    """Writes a small text file through a temporary name, fsync and rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def tree_size(path: Path) -> int:
    """Bytes of a file or of every file under a folder."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
