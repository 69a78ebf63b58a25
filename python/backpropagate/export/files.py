"""Outputs that appear under their final name only when complete, with the usual modes.

Every file or folder is built under a hidden temporary name beside its target,
`.<name>.<pid>.tmp` (the Rust GGUF writer uses the same pattern), fsynced and renamed
into place; a replaced output waits as `.<name>.<pid>.old` until the new one is in place.
A failure or a kill therefore leaves at most such hidden names, never a half-written
output under the final name, and `remove_leftovers` clears them on the next start:
only these exact names of processes that are gone, never anything of the user's.

Outputs get the modes of any file the user creates (0644 / 0755 under umask 022), even
where a library wrote a private (0600) temporary file that became the output.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from backpropagate.errors import StateError


def check_free(path: Path, force: bool) -> None:
    """Raises STATE_OUTPUT_EXISTS when `path` exists and `force` is off."""
    if path.exists() and not force:
        raise StateError("STATE_OUTPUT_EXISTS", f"{path}: already exists")


def temp_path(target: Path) -> Path:
    """The hidden name `target` is built under by this process."""
    return target.with_name(f".{target.name}.{os.getpid()}.tmp")


def _old_path(target: Path) -> Path:
    return target.with_name(f".{target.name}.{os.getpid()}.old")


def _process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, owned by someone else
        return False
    return False


def remove_leftovers(folder: Path, names: Iterable[str]) -> list[Path]:
    """Clears what killed writers of `names` in `folder` left; returns what it removed.

    `.<name>.<pid>.tmp` of a process that is gone is removed; `.<name>.<pid>.old` (an
    output being replaced when the kill came) is put back when `<name>` is missing,
    else removed. Folders named `.<name>.<8 random characters>.tmp` were made by
    earlier versions and are removed too.
    """
    if not folder.is_dir():
        return []
    wanted = {name: re.compile(rf"\.{re.escape(name)}\.(?:(\d+)\.(tmp|old)|[a-z0-9_]{{8}}\.tmp)") for name in names}
    removed = []
    for entry in folder.iterdir():
        for name, pattern in wanted.items():
            match = pattern.fullmatch(entry.name)
            if match is None or (match.group(1) and not _process_gone(int(match.group(1)))):
                continue
            if match.group(1) is None and not entry.is_dir():
                continue
            target = folder / name
            if match.group(2) == "old" and not target.exists():
                entry.rename(target)
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed.append(entry)
    return removed


def _umask() -> int:
    # /proc tells without changing anything; os.umask can only be read by setting it.
    with contextlib.suppress(OSError, ValueError, StopIteration):
        status = Path("/proc/self/status").read_text().splitlines()
        return int(next(line for line in status if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_default_modes(root: Path) -> None:
    """Gives `root` and everything under it the modes the umask makes (0644 files, 0755 folders)."""
    mask = _umask()
    paths = [root, *root.rglob("*")] if root.is_dir() else [root]
    for path in paths:
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def fsync_dir(path: Path) -> None:
    """Makes a rename or creation inside `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Flushes every file under `root` (and the folders) to disk."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(Path(dirpath))


def replace_dir(tmp: Path, target: Path) -> None:
    """Renames the finished folder `tmp` to `target`, replacing an existing one."""
    if target.exists():
        old = _old_path(target)
        target.rename(old)
        tmp.rename(target)
        if old.is_dir():
            shutil.rmtree(old)
        else:
            old.unlink()
    else:
        tmp.rename(target)
    fsync_dir(target.parent)


@contextlib.contextmanager
def atomic_dir(target: Path, force: bool) -> Iterator[Path]:
    """Yields a temporary folder that becomes `target` when the block succeeds."""
    check_free(target, force)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(target.parent, [target.name])
    tmp = temp_path(target)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        apply_default_modes(tmp)
        fsync_tree(tmp)
        replace_dir(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[BinaryIO]:
    """Yields a binary file that replaces `path` (fsynced) when the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    """Writes a text file through a temporary name, fsync and rename."""
    with atomic_file(path) as f:
        f.write(text.encode("utf-8"))


def copy_atomic(src: Path, dst: Path) -> None:
    """Copies `src` to `dst` so that `dst` is either absent, the old file or the whole copy."""
    with open(src, "rb") as inp, atomic_file(dst) as out:
        shutil.copyfileobj(inp, out, 8 << 20)


def tree_size(path: Path) -> int:
    """Bytes of a file or of every file under a folder."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
