"""The one folder the web UI may read and write, and the checks on every path it is given.

Every path from a request is relative to the workspace; `..`, absolute paths and links
that resolve outside it are refused with INPUT_PATH_OUTSIDE_WORKSPACE before anything is
opened. Uploads are capped in size and limited to the dataset file types.
"""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from backpropagate.errors import InputError
from backpropagate.presets import find_preset

DATA_SUFFIXES = (".jsonl", ".json", ".parquet")
RUNS = "runs"
UPLOADS = "uploads"
# Folders a listing of data files skips: the UI's own outputs and hidden or tool folders.
_SKIPPED = {RUNS, ".venv", "node_modules", "__pycache__", "target"}
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def outside(path: str) -> InputError:
    """The refusal of a path that leaves the workspace (the message names the path only)."""
    return InputError("INPUT_PATH_OUTSIDE_WORKSPACE", f"{path!r} is not a path inside the workspace")


def check_name(name: str, what: str = "name") -> str:
    """A plain file or run name (letters, digits, `.`, `_`, `-`; no separators), else refused."""
    if not _SAFE_NAME.fullmatch(name) or name in (".", ".."):
        raise InputError("INPUT_PATH_OUTSIDE_WORKSPACE", f"{what} {name!r}: use letters, digits, '.', '_' and '-' only")
    return name


@dataclass(frozen=True)
class Workspace:
    """The workspace folder, resolved once; `max_upload_bytes` caps each upload."""

    root: Path
    max_upload_bytes: int

    @classmethod
    def open(cls, folder: str | Path, max_upload_bytes: int) -> Workspace:
        """The workspace at `folder` (created if missing)."""
        root = Path(folder).expanduser()
        root.mkdir(parents=True, exist_ok=True)
        return cls(root.resolve(), max_upload_bytes)

    def resolve(self, relative: str) -> Path:
        """The real path of `relative` inside the workspace; refused if it leads out.

        Raises:
            InputError: INPUT_PATH_OUTSIDE_WORKSPACE for an absolute path, a `..` part, or a
                link (anywhere on the way) that resolves outside the workspace.
        """
        text = relative.replace("\\", "/")
        pure = PurePosixPath(text)
        if not text or "\x00" in text or pure.is_absolute() or ".." in pure.parts or re.match(r"^[A-Za-z]:", text):
            raise outside(relative)
        real = (self.root / pure).resolve()
        if real != self.root and self.root not in real.parents:
            raise outside(relative)
        return real

    def model_ref(self, model: str) -> str:
        """`model` as a worker may be given it: a preset or hub id as is, a folder only inside the workspace.

        Raises:
            InputError: INPUT_PATH_OUTSIDE_WORKSPACE for an absolute, `~` or `..` path, or a link out.
        """
        text = model.strip()
        if find_preset(text) is not None:
            return text
        pure = PurePosixPath(text.replace("\\", "/"))
        if pure.is_absolute() or text.startswith("~") or ".." in pure.parts:
            raise outside(model)
        candidate = self.root / pure
        if candidate.exists() or candidate.is_symlink():
            return str(self.resolve(text))
        return text  # a Hugging Face id

    def relative(self, path: Path) -> str:
        """`path` (inside the workspace) as the workspace-relative string pages show."""
        return path.resolve().relative_to(self.root).as_posix()

    def data_files(self) -> list[str]:
        """Dataset files in the workspace (sorted, relative), skipping run outputs and hidden folders."""
        found = []
        for folder, dirs, files in os.walk(self.root):
            dirs[:] = sorted(d for d in dirs if d not in _SKIPPED and not d.startswith("."))
            found += [
                self.relative(Path(folder) / f)
                for f in files
                if f.lower().endswith(DATA_SUFFIXES) and self._inside(Path(folder) / f)
            ]
        return sorted(found)

    def _inside(self, path: Path) -> bool:
        real = path.resolve()
        return self.root in real.parents

    def runs_dir(self) -> Path:
        """`<workspace>/runs`, where UI runs write."""
        return self.root / RUNS

    async def save_upload(self, name: str, chunks: AsyncIterator[bytes]) -> Path:
        """Writes an uploaded dataset to `uploads/<name>`, refusing other types and oversize files.

        Raises:
            InputError: INPUT_UPLOAD_REJECTED for a wrong type or a file over the cap (nothing is
                kept); INPUT_PATH_OUTSIDE_WORKSPACE for a name that is not a plain file name.
        """
        # Only the last part of the name the browser sent, other characters replaced: `my data.jsonl` -> `my-data.jsonl`.
        plain = re.sub(r"[^A-Za-z0-9._-]+", "-", PurePosixPath(name.replace("\\", "/")).name).lstrip(".-")
        name = check_name(plain, "file name")
        if not name.lower().endswith(DATA_SUFFIXES):
            raise InputError("INPUT_UPLOAD_REJECTED", f"{name}: only {', '.join(DATA_SUFFIXES)} files are accepted")
        folder = self.root / UPLOADS
        folder.mkdir(exist_ok=True)
        target = self.resolve(f"{UPLOADS}/{name}")
        partial = target.with_name(f".{name}.part")
        size = 0
        try:
            with open(partial, "wb") as out:
                async for chunk in chunks:
                    size += len(chunk)
                    if size > self.max_upload_bytes:
                        raise InputError(
                            "INPUT_UPLOAD_REJECTED",
                            f"{name}: larger than the upload limit of {self.max_upload_bytes // 2**20} MiB",
                        )
                    out.write(chunk)
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
        return target
