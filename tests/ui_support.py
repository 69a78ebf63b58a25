"""A real `backprop ui` server (uvicorn on a free loopback port, in a thread) for the UI tests."""

from __future__ import annotations

import re
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import uvicorn

from backpropagate.ui.app import UIConfig, create_app
from backpropagate.ui.security import parse_auth

USER, PASSWORD = "ada", "correct horse battery staple"
EXAMPLE = Path(__file__).resolve().parents[1] / "python/backpropagate/examples/chat.jsonl"


@dataclass
class Server:
    url: str
    workspace: Path
    app: object


@contextmanager
def ui_server(workspace: Path, auth: bool = True, max_upload_bytes: int = 2**20) -> Iterator[Server]:
    """Serves the UI over `workspace` (with the example data in it) until the block ends; stops its runs then."""
    workspace.mkdir(parents=True, exist_ok=True)
    shutil.copy(EXAMPLE, workspace / "chat.jsonl")
    app = create_app(
        UIConfig(
            workspace=workspace,
            credential=parse_auth(f"{USER}:{PASSWORD}") if auth else None,
            max_upload_bytes=max_upload_bytes,
        )
    )
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", access_log=False))
    app.state.ui.stopping = lambda: server.should_exit
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "the UI server did not start"
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield Server(f"http://127.0.0.1:{port}", workspace, app)
    finally:
        runs = app.state.ui.runs
        runs.stop_all()
        for name in list(runs._procs):
            runs._procs[name].wait(timeout=120)
        server.should_exit = True
        thread.join(timeout=10)


def csrf_of(html: str) -> str:
    """The CSRF token a page carries."""
    found = re.search(r'name="csrf" content="([^"]+)"', html) or re.search(r'name="csrf" value="([^"]+)"', html)
    assert found, "page has no CSRF token"
    return found.group(1)


def logged_in(server: Server) -> tuple[httpx.Client, str]:
    """An HTTP client with a session, and its CSRF token."""
    client = httpx.Client(base_url=server.url, timeout=60)
    token = csrf_of(client.get("/login").text)
    res = client.post(
        "/login", data={"user": USER, "password": PASSWORD, "csrf": token}, headers={"Origin": server.url}
    )
    assert res.status_code == 303, res.text
    page = client.get("/data")
    return client, csrf_of(page.text)
