"""Pushing exports to the Hugging Face Hub, against a local hub.

The local hub speaks the endpoints `huggingface_hub` calls, as recorded from the library:
`POST /api/repos/create`, `POST /api/models/{repo}/preupload/{revision}`, the LFS batch
`POST /{repo}.git/info/lfs/objects/batch` then `PUT` to the returned href, and the NDJSON
commit `POST /api/models/{repo}/commit/{revision}` (plus `POST /api/validate-yaml` for model
cards). It has no Xet storage, so `HF_HUB_DISABLE_XET` is set, as the hub allows; the client
is the real `HfApi`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from test_export import make_adapter

TOKEN = "hf_PushTestTokenAbcdefghijklmnop"


@dataclass
class FakeHub:
    """What the local hub holds: repos (id -> private), files per repo, and the requests."""

    url: str = ""
    repos: dict[str, bool] = field(default_factory=dict)
    files: dict[str, dict[str, bytes]] = field(default_factory=dict)
    lfs: dict[str, bytes] = field(default_factory=dict)
    requests: list[tuple[str, str, str]] = field(default_factory=list)
    can_create: bool = True


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def _reply(self, status: int, body: object, headers: dict[str, str] | None = None) -> None:
            raw = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(raw)

        def _handle(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            auth = self.headers.get("Authorization", "")
            hub.requests.append((self.command, self.path, auth))
            path = self.path.split("?")[0]
            if path.startswith("/lfs/"):  # the LFS upload target (a storage URL on the real hub)
                oid = path.rsplit("/", 1)[1]
                if hashlib.sha256(body).hexdigest() != oid:
                    return self._reply(400, {"error": "sha256 mismatch"})
                hub.lfs[oid] = body
                return self._reply(200, {})
            if auth != f"Bearer {TOKEN}":
                return self._reply(401, {"error": "Invalid credentials in Authorization header"})
            if path == "/api/agent-harnesses" or path == "/api/validate-yaml":
                return self._reply(200, {})
            if path == "/api/repos/create":
                req = json.loads(body)
                repo = f"{req['organization']}/{req['name']}"
                if not hub.can_create:
                    return self._reply(
                        403, {"error": "You don't have the rights to create a model under this namespace"}
                    )
                if repo in hub.repos:
                    return self._reply(
                        409, {"error": "You already created this model repo", "url": f"{hub.url}/{repo}"}
                    )
                hub.repos[repo] = req.get("visibility") == "private" or bool(req.get("private"))
                hub.files[repo] = {}
                return self._reply(200, {"url": f"{hub.url}/{repo}", "name": repo})
            parts = path.strip("/").split("/")
            if path.endswith(".git/info/lfs/objects/batch"):
                objects = json.loads(body)["objects"]
                actions = [
                    {"oid": o["oid"], "size": o["size"], "actions": {"upload": {"href": f"{hub.url}/lfs/{o['oid']}"}}}
                    for o in objects
                ]
                return self._reply(200, {"transfer": "basic", "objects": actions})
            if parts[:2] == ["api", "models"] and len(parts) == 4:  # repo info
                repo = "/".join(parts[2:4])
                if repo not in hub.repos:
                    return self._reply(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
                return self._reply(200, {"id": repo, "private": hub.repos[repo], "sha": "a" * 40})
            if parts[:2] == ["api", "models"] and parts[4:5] in (["preupload"], ["commit"]):
                repo = "/".join(parts[2:4])
                if repo not in hub.repos:
                    return self._reply(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
                if parts[4] == "preupload":
                    files = json.loads(body)["files"]
                    modes = [
                        {
                            "path": f["path"],
                            "uploadMode": "lfs" if f["size"] > 1000 else "regular",
                            "shouldIgnore": False,
                        }
                        for f in files
                    ]
                    return self._reply(200, {"files": modes})
                for line in body.decode().splitlines():
                    item = json.loads(line)
                    value = item["value"]
                    if item["key"] == "file":
                        hub.files[repo][value["path"]] = base64.b64decode(value["content"])
                    elif item["key"] == "lfsFile":
                        hub.files[repo][value["path"]] = hub.lfs[value["oid"]]
                return self._reply(200, {"commitUrl": f"{hub.url}/{repo}/commit/{'a' * 40}", "commitOid": "a" * 40})
            return self._reply(404, {"error": f"no route {path}"})

        do_GET = do_POST = do_PUT = _handle

    return Handler


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    from huggingface_hub import constants

    state = FakeHub()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    state.url = f"http://127.0.0.1:{server.server_port}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setattr(constants, "ENDPOINT", state.url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    yield state
    server.shutdown()
    server.server_close()


def _on_disk(folder: Path, names: list[str]) -> dict[str, bytes]:
    return {n: (folder / n).read_bytes() for n in names}


def test_export_gguf_then_push_to_hub(hub: FakeHub, tiny_llama: Path, tmp_path: Path) -> None:
    from cli_helpers import run_cli

    out = tmp_path / "gguf"
    r = run_cli("export", str(tiny_llama), "-f", "gguf", "-q", "q8_0", "-o", str(out), "--push-to-hub", "me/tiny-gguf")
    assert r.status == 0, r.stderr
    gguf_file = next(out.glob("*.gguf"))
    assert hub.repos == {"me/tiny-gguf": False}
    assert hub.files["me/tiny-gguf"] == _on_disk(out, [gguf_file.name, "README.md"])
    assert gguf_file.name in r.stdout and f"{hub.url}/me/tiny-gguf" in r.stdout
    assert TOKEN not in r.stdout + r.stderr
    # the large file went through LFS (batch, then PUT), the card inline in the commit
    assert any(p.endswith(".git/info/lfs/objects/batch") for _, p, _ in hub.requests)
    assert all(a == f"Bearer {TOKEN}" for m, p, a in hub.requests if p.startswith(("/api/repos", "/api/models")))


def test_push_run_folder_exports_the_adapter_with_its_card(hub: FakeHub, tiny_llama: Path, tmp_path: Path) -> None:
    from cli_helpers import run_cli

    run = tmp_path / "run"
    make_adapter(tiny_llama, run / "adapter", "tiny-llama")
    r = run_cli("push", str(run), "--repo", "me/adapter", "--private")
    assert r.status == 0, r.stderr
    assert hub.repos == {"me/adapter": True}
    pushed = hub.files["me/adapter"]
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md", "tokenizer.json"} <= set(pushed)
    assert pushed["adapter_model.safetensors"] == (run / "adapter" / "adapter_model.safetensors").read_bytes()
    assert "tiny-llama" in pushed["README.md"].decode()
    assert sorted(p.name for p in run.iterdir()) == ["adapter"]  # the LoRA export was temporary
    again = run_cli("push", str(run), "--repo", "me/adapter")  # an existing repo is kept
    assert again.status == 0, again.stderr


def test_push_merged_export(hub: FakeHub, tiny_llama: Path, tmp_path: Path) -> None:
    from backpropagate.export import export
    from backpropagate.export.hub import push

    adapter = make_adapter(tiny_llama, tmp_path / "adapter", "tiny-llama")
    merged = export(adapter, "merged", output=tmp_path / "merged")
    result = push(merged.path, "me/merged")
    names = sorted(p.name for p in merged.path.iterdir())
    assert result.files == names and hub.files["me/merged"] == _on_disk(merged.path, names)


def test_hub_errors_are_coded(hub: FakeHub, tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from backpropagate.export import export
    from cli_helpers import run_cli

    folder = export(tiny_llama, "gguf", output=tmp_path / "g", quantization="q8_0").path.parent
    monkeypatch.setenv("HF_TOKEN", "hf_WrongTokenWrongTokenWrong")
    r = run_cli("push", str(folder), "--repo", "me/x")
    assert r.status == 4 and "[DEP_HUB_AUTH_FAILED]" in r.stderr and "401" in r.stderr
    assert "hf_WrongTokenWrongTokenWrong" not in r.stdout + r.stderr

    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "no-login"))
    monkeypatch.setattr("huggingface_hub.constants.HF_TOKEN_PATH", str(tmp_path / "no-login" / "token"))
    r = run_cli("push", str(folder), "--repo", "me/x")
    assert r.status == 4 and "[DEP_HUB_AUTH_FAILED]" in r.stderr and "HF_TOKEN" in r.stderr

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    hub.can_create = False
    r = run_cli("push", str(folder), "--repo", "someone-else/x")
    assert r.status == 4 and "[DEP_HUB_AUTH_FAILED]" in r.stderr and "403" in r.stderr, r.stderr
    hub.can_create = True

    r = run_cli("push", str(folder), "--repo", "not-a-repo-id")
    assert r.status == 3 and "[INPUT_HUB_REPO_NOT_FOUND]" in r.stderr

    r = run_cli("push", str(tmp_path / "nothing"), "--repo", "me/x")
    assert r.status == 3 and "[INPUT_FILE_NOT_FOUND]" in r.stderr


def test_missing_repo_and_unreachable_hub(
    tiny_llama: Path, tmp_path: Path, hub: FakeHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import HfApi

    from backpropagate.errors import BackpropagateError
    from backpropagate.export import export
    from backpropagate.export.hub import _hub_call, push

    folder = export(tiny_llama, "gguf", output=tmp_path / "g", quantization="q8_0").path.parent
    # a repo deleted between create and commit: the commit's preupload answers 404
    with pytest.raises(BackpropagateError) as err:
        _hub_call("me/gone", HfApi(token=TOKEN).create_commit, "me/gone", [], commit_message="x")
    assert err.value.code == "INPUT_HUB_REPO_NOT_FOUND"

    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", closed)
    with pytest.raises(BackpropagateError) as err:
        push(folder, "me/x")
    assert err.value.code == "DEP_HUB_UNREACHABLE"
