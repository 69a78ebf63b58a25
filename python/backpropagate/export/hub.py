"""Pushing an export (or a run's adapter) to the Hugging Face Hub.

Everything goes through `huggingface_hub.HfApi`: `create_repo` (kept if it exists), then one
`create_commit` of the export's files (the library pre-uploads large files through LFS or Xet
as the hub asks). The token comes from `HF_TOKEN` or the huggingface_hub login and is never
printed; failures map to coded errors: auth (401/403), missing repo (404), network.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backpropagate.errors import DependencyError, InputError
from backpropagate.export.provenance import SUFFIX as RECORD_SUFFIX

# Files written beside a GGUF that belong to its upload (the card links the loss curve).
_BESIDE_GGUF = ("README.md", "Modelfile")


@dataclass
class PushResult:
    """What a push uploaded, and where."""

    repo: str
    url: str
    files: list[str]
    commit_url: str


def _adapter_of(path: Path) -> Path | None:
    """The adapter folder `path` is, or the run folder holds; None for an export."""
    if (path / "README.md").is_file():
        return None
    for folder in (path, path / "adapter", path / "model"):
        if (folder / "adapter_config.json").is_file() or (folder / "config.json").is_file():
            return folder
    return None


def upload_files(path: Path) -> tuple[Path, list[str]]:
    """The folder to upload from and the file names in it that make up the export at `path`.

    Raises:
        InputError: INPUT_FILE_NOT_FOUND when `path` holds no export.
    """
    if path.is_file() and path.suffix == ".gguf":
        folder = path.parent
        extra = [n for n in _BESIDE_GGUF if (folder / n).is_file()]
        return folder, [path.name, *extra, *sorted(p.name for p in folder.glob("*.png"))]
    if path.is_dir():
        names = sorted(
            p.name
            for p in path.iterdir()
            if p.is_file() and not p.name.startswith(".") and not p.name.endswith(RECORD_SUFFIX)
        )
        if names:
            return path, names
    raise InputError("INPUT_FILE_NOT_FOUND", f"{path}: no export to push (expected an export folder or a .gguf file)")


def _token() -> str:
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise DependencyError(
            "DEP_HUB_AUTH_FAILED", "no Hugging Face token: set HF_TOKEN or log in with `hf auth login`"
        )
    return token


def _hub_error(exc: Exception, repo: str) -> DependencyError | InputError:
    """Maps what huggingface_hub raised to a coded error; the token never appears in it."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled, RepositoryNotFoundError

    if isinstance(exc, OfflineModeIsEnabled):
        return DependencyError("DEP_HUB_UNREACHABLE", f"{repo}: HF_HUB_OFFLINE is set, so the hub is not contacted")
    if isinstance(exc, RepositoryNotFoundError):
        return InputError("INPUT_HUB_REPO_NOT_FOUND", f"{repo}: the repository does not exist or is not yours")
    if isinstance(exc, HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else None
        if status in (401, 403):
            return DependencyError("DEP_HUB_AUTH_FAILED", f"{repo}: the hub refused the token (HTTP {status})")
        if status == 404:
            return InputError("INPUT_HUB_REPO_NOT_FOUND", f"{repo}: not found on the hub (HTTP 404)")
        return DependencyError("DEP_HUB_UNREACHABLE", f"{repo}: the hub answered HTTP {status}")
    return DependencyError("DEP_HUB_UNREACHABLE", f"{repo}: cannot reach the hub ({type(exc).__name__})")


def _transport_error() -> type[Exception]:
    """The HTTP client's network failure (huggingface_hub 2 uses httpx2, earlier ones httpx)."""
    try:
        import httpx2

        return httpx2.TransportError
    except ImportError:
        import httpx

        return httpx.TransportError


def _hub_call(repo: str, call: Any, *args: Any, **kwargs: Any) -> Any:
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    try:
        return call(*args, **kwargs)
    except (HfHubHTTPError, OfflineModeIsEnabled, _transport_error()) as exc:
        raise _hub_error(exc, repo) from None


def push_folder(folder: Path, names: list[str], repo: str, private: bool = False) -> PushResult:
    """Creates `repo` (kept if it exists) and commits `names` from `folder` to it."""
    from huggingface_hub import CommitOperationAdd, HfApi

    if repo.count("/") != 1 or not all(repo.split("/")):
        raise InputError("INPUT_HUB_REPO_NOT_FOUND", f"{repo!r}: expected a repository id like user/name")
    api = HfApi(token=_token())
    url = _hub_call(repo, api.create_repo, repo, private=private, exist_ok=True, repo_type="model")
    ops = [CommitOperationAdd(path_in_repo=n, path_or_fileobj=str(folder / n)) for n in names]
    info = _hub_call(repo, api.create_commit, repo, ops, commit_message=f"Upload {', '.join(names)}")
    return PushResult(repo=repo, url=str(url), files=names, commit_url=str(info.commit_url))


def push(path: str | Path, repo: str, private: bool = False) -> PushResult:
    """Pushes an export folder or GGUF file, or a run's adapter (exported with its card first).

    Raises:
        InputError: INPUT_FILE_NOT_FOUND (nothing to push), INPUT_HUB_REPO_NOT_FOUND.
        DependencyError: DEP_HUB_AUTH_FAILED (no token, or refused), DEP_HUB_UNREACHABLE.
    """
    target = Path(path).expanduser()
    adapter = _adapter_of(target) if target.is_dir() else None
    if adapter is None:
        folder, names = upload_files(target)
        return push_folder(folder, names, repo, private)
    from backpropagate.export import export

    fmt = "lora" if (adapter / "adapter_config.json").is_file() else "merged"
    with tempfile.TemporaryDirectory(prefix=".push-", dir=adapter.parent) as tmp:
        result = export(adapter, fmt, output=Path(tmp) / fmt)  # type: ignore[arg-type]
        folder, names = upload_files(result.path)
        return push_folder(folder, names, repo, private)
