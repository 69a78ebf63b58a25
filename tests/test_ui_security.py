"""The web UI's security contract, checked with an HTTP client against a real server.

Every endpoint refuses without a session; state changes need the session's CSRF token and
this server's Origin; paths stay in the workspace; uploads are capped and typed; logins
are rate limited; cookies are signed, HttpOnly and SameSite=Strict; no secret reaches a
page; listening beyond loopback without a login is refused.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from starlette.routing import Route

from backpropagate.ui import routes
from backpropagate.ui.security import Credential, LoginLimiter, is_loopback, same_origin
from backpropagate.ui.workers import log_line
from backpropagate.ui.workspace import Workspace
from cli_helpers import run_cli
from ui_support import PASSWORD, USER, csrf_of, logged_in, ui_server


@pytest.fixture
def server(tmp_path):
    with ui_server(tmp_path / "ws") as running:
        yield running


def _endpoints() -> list[tuple[str, str]]:
    found = []
    for route in routes.ROUTES:
        assert isinstance(route, Route)
        if route.path.startswith("/login"):
            continue
        for method in sorted((route.methods or set()) - {"HEAD"}):
            found.append((method, route.path.replace("{name}", "some-run")))
    return found


@pytest.mark.parametrize(("method", "path"), _endpoints())
def test_every_endpoint_refuses_without_a_session(server, method, path):
    with httpx.Client(base_url=server.url) as client:
        res = client.request(method, path, headers={"Origin": server.url})
    if method == "GET" and res.status_code == 303:
        assert res.headers["location"] == "/login"  # a page sends the visitor to the login form
    else:
        assert res.status_code == 401
        assert res.json()["error"]["code"] == "login_required"


def test_a_forged_or_tampered_cookie_is_no_session(server):
    client, _ = logged_in(server)
    cookie = client.cookies["backprop_session"]
    with httpx.Client(base_url=server.url) as other:
        other.cookies.set("backprop_session", cookie[:-4] + ("AAAA" if not cookie.endswith("AAAA") else "BBBB"))
        assert other.get("/runs/x/state").status_code == 401
    client.close()


def test_state_changes_need_the_csrf_token_and_this_origin(server):
    client, token = logged_in(server)
    good = {"X-CSRF-Token": token, "Origin": server.url}
    assert client.post("/runs/none/stop", headers={"Origin": server.url}).status_code == 403  # no token
    assert client.post("/runs/none/stop", headers={**good, "X-CSRF-Token": "guess"}).status_code == 403
    assert client.post("/runs/none/stop", headers={**good, "Origin": "http://evil.example"}).status_code == 403
    assert client.post("/runs/none/stop", headers={"X-CSRF-Token": token}).status_code == 403  # no Origin/Referer
    form = {"csrf": token, "name": "x", "data": "chat.jsonl", "model": "tiny-llama"}
    assert client.post("/train", data=form, headers={"Origin": "http://evil.example"}).status_code == 403
    assert not (server.workspace / "runs/x").exists()
    # With both, the request goes through (there is no such run to stop).
    res = client.post("/runs/none/stop", headers=good)
    assert res.status_code == 404 and res.json()["error"]["code"] == "STATE_RUN_NOT_FOUND"
    client.close()


def test_login_needs_csrf_and_origin_and_is_rate_limited(server):
    with httpx.Client(base_url=server.url) as client:
        token = csrf_of(client.get("/login").text)
        ok = {"user": USER, "password": PASSWORD, "csrf": token}
        assert client.post("/login", data=ok, headers={"Origin": "http://evil.example"}).status_code == 403
        assert client.post("/login", data={**ok, "csrf": "x"}, headers={"Origin": server.url}).status_code == 403
        for _ in range(5):
            res = client.post("/login", data={**ok, "password": "wrong"}, headers={"Origin": server.url})
            assert res.status_code == 401 and PASSWORD not in res.text
        # Now even the right password waits.
        res = client.post("/login", data=ok, headers={"Origin": server.url})
        assert res.status_code == 429 and "Too many failed logins" in res.text
        assert client.get("/runs/x/state").status_code == 401


def test_limiter_lets_a_key_try_again_after_the_window():
    limiter = LoginLimiter(attempts=2, window_s=0.2)
    limiter.failed("ip:1")
    assert limiter.blocked("ip:1") == 0
    limiter.failed("ip:1")
    assert limiter.blocked("ip:1") > 0 and limiter.blocked("ip:2") == 0
    time.sleep(0.25)
    assert limiter.blocked("ip:1") == 0


def test_session_cookie_flags_and_security_headers(server):
    with httpx.Client(base_url=server.url) as client:
        res = client.get("/login")
        cookie = res.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie
        for name in ("content-security-policy", "x-content-type-options", "x-frame-options", "referrer-policy"):
            assert name in res.headers
        assert "frame-ancestors 'none'" in res.headers["content-security-policy"]
        assert "script-src 'self'" in res.headers["content-security-policy"]


def test_a_foreign_host_header_is_refused_on_loopback(server):
    # A DNS-rebinding page reaches 127.0.0.1 under its own name.
    with httpx.Client(base_url=server.url) as client:
        assert client.get("/login", headers={"Host": "evil.example"}).status_code == 400


@pytest.mark.parametrize("path", ["../outside.jsonl", "/etc/passwd", "a/../../outside.jsonl", "link/outside.jsonl"])
def test_paths_outside_the_workspace_are_refused(server, tmp_path, path):
    (tmp_path / "outside.jsonl").write_text('{"text": "secret"}\n')
    os.symlink(tmp_path, server.workspace / "link")
    client, token = logged_in(server)
    res = client.get("/data", params={"file": path, "model": "tiny-llama"})
    assert res.status_code == 403 and "INPUT_PATH_OUTSIDE_WORKSPACE" in res.text and "secret" not in res.text
    form = {"csrf": token, "name": "t", "data": path, "model": "tiny-llama"}
    res = client.post("/train", data=form, headers={"Origin": server.url})
    assert res.status_code == 403 and "INPUT_PATH_OUTSIDE_WORKSPACE" in res.text
    assert not (server.workspace / "runs/t").exists()
    res = client.post(
        "/runs/x/chat", json={"gguf": path, "messages": []}, headers={"X-CSRF-Token": token, "Origin": server.url}
    )
    assert res.status_code == 403 and res.json()["error"]["code"] == "INPUT_PATH_OUTSIDE_WORKSPACE"
    client.close()


@pytest.mark.parametrize("name", ["..", "a/b", "../../x", ".hidden"])
def test_run_names_cannot_leave_the_runs_folder(server, name):
    client, _ = logged_in(server)
    res = client.get(f"/runs/{name}/state")
    assert res.status_code in (403, 404)
    client.close()


def test_workspace_resolution_refuses_symlinks_out(tmp_path):
    ws = Workspace.open(tmp_path / "ws", 1024)
    (tmp_path / "secret.jsonl").write_text("{}\n")
    os.symlink(tmp_path / "secret.jsonl", ws.root / "inside.jsonl")
    (ws.root / "ok.jsonl").write_text("{}\n")
    assert ws.resolve("ok.jsonl") == ws.root / "ok.jsonl"
    for bad in ("inside.jsonl", "../secret.jsonl", str(tmp_path / "secret.jsonl"), "C:/x", "a\x00b"):
        with pytest.raises(Exception, match="INPUT_PATH_OUTSIDE_WORKSPACE"):
            ws.resolve(bad)
    assert ws.data_files() == ["ok.jsonl"]  # the link out is not listed


def _upload(client: httpx.Client, server, token: str, name: str, content: bytes) -> httpx.Response:
    return client.post(
        "/data/upload",
        data={"csrf": token},
        files={"file": (name, content, "application/octet-stream")},
        headers={"Origin": server.url},
    )


def test_uploads_are_capped_typed_and_kept_in_the_workspace(server):
    client, token = logged_in(server)
    uploads = server.workspace / "uploads"
    res = _upload(client, server, token, "big.jsonl", b'{"text": "x"}\n' * (2**20 // 14 + 10))  # over the 1 MiB cap
    assert res.status_code == 400 and "INPUT_UPLOAD_REJECTED" in res.text
    res = _upload(client, server, token, "run.sh", b"echo hi\n")
    assert res.status_code == 400 and "INPUT_UPLOAD_REJECTED" in res.text
    assert not uploads.exists() or not any(uploads.iterdir())  # nothing kept, not even a partial file
    res = _upload(client, server, token, "../../escape.jsonl", b'{"text": "hello"}\n')
    assert res.status_code == 303 and res.headers["location"] == "/data?file=uploads/escape.jsonl"
    assert (uploads / "escape.jsonl").is_file() and not (server.workspace.parent / "escape.jsonl").exists()
    res = _upload(client, server, token, "my data (v2).jsonl", b'{"text": "hello"}\n')
    assert (
        res.headers["location"] == "/data?file=uploads/my-data-v2-.jsonl" and (uploads / "my-data-v2-.jsonl").is_file()
    )
    # Without the token the upload is refused and nothing is written.
    client.post("/data/upload", files={"file": ("x.jsonl", b"{}\n")}, headers={"Origin": server.url})
    assert not (uploads / "x.jsonl").exists()
    client.close()


def test_passwords_are_kept_hashed():
    cred = Credential.create(USER, PASSWORD)
    assert PASSWORD.encode() not in cred.digest + cred.salt and PASSWORD not in repr(cred)
    assert cred.matches(USER, PASSWORD)
    assert not cred.matches(USER, PASSWORD + "x") and not cred.matches("eve", PASSWORD)
    assert Credential.create(USER, PASSWORD).digest != cred.digest  # salted


def test_no_secret_reaches_a_page_or_a_log_line(server):
    client, _ = logged_in(server)
    for path in ("/data", "/train", "/runs"):
        assert PASSWORD not in client.get(path).text
    line = log_line({"ts": 1.0, "level": "info", "message": "pushing with HF_TOKEN=hf_abcdefghijklmnopqrstuvwx"})
    assert "hf_abcdefghijklmnopqrstuvwx" not in line["message"] and "[REDACTED]" in line["message"]
    client.close()


def test_origin_check():
    assert same_origin("http://127.0.0.1:7860", None, "http", "127.0.0.1:7860")
    assert not same_origin("http://127.0.0.1:7861", None, "http", "127.0.0.1:7860")
    assert same_origin(None, "http://127.0.0.1:7860/data", "http", "127.0.0.1:7860")
    assert not same_origin(None, "http://127.0.0.1:7860.evil.example/", "http", "127.0.0.1:7860")
    assert not same_origin(None, None, "http", "127.0.0.1:7860")
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5")


@pytest.mark.parametrize("args", [["--host", "0.0.0.0"], ["--share"], ["--host", "192.168.1.5"]])
def test_listening_beyond_loopback_without_auth_is_refused(args):
    res = run_cli("ui", *args)
    assert res.status == 5
    assert res.stderr.startswith("[RUNTIME_UI_AUTH_NOT_ENFORCED]:")


def test_a_malformed_auth_is_refused_without_echoing_it(tmp_path):
    res = run_cli("ui", "--host", "0.0.0.0", "--auth", "no-colon-secret")
    assert res.status == 2 and "[CONFIG_INVALID_SETTING]" in res.stderr and "no-colon-secret" not in res.stderr
    auth_file = tmp_path / "auth"
    auth_file.write_text("only-a-secret-word\n")
    res = run_cli("ui", "--share", "--auth-file", str(auth_file))
    assert res.status == 2 and "only-a-secret-word" not in res.stderr


def test_unauthenticated_loopback_ui_still_checks_csrf(tmp_path):
    with ui_server(tmp_path / "ws", auth=False) as open_server, httpx.Client(base_url=open_server.url) as client:
        assert client.get("/runs/x/state").status_code == 401  # no session yet: scripts are refused
        token = csrf_of(client.get("/data").text)  # a page visit opens one
        assert client.post("/runs/x/stop", headers={"Origin": open_server.url}).status_code == 403
        res = client.post("/runs/x/stop", headers={"Origin": open_server.url, "X-CSRF-Token": token})
        assert res.status_code == 404


def test_auth_file_login_works(tmp_path):
    from backpropagate.ui.security import read_auth_file

    path = tmp_path / "auth"
    path.write_text(f"{USER}:{PASSWORD}\n")
    assert read_auth_file(path).matches(USER, PASSWORD)


def _listening_addresses(port: int) -> set[str]:
    """Local IPv4 addresses with a listening TCP socket on `port` (from /proc/net/tcp)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, _, state = line.split()[1:4]
        address, hex_port = local.split(":")
        if int(hex_port, 16) == port and state == "0A":  # LISTEN
            found.add(".".join(str(b) for b in reversed(bytes.fromhex(address))))
    return found


def test_backprop_ui_listens_on_loopback_by_default(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    script = Path(sys.executable).with_name("backprop")
    proc = subprocess.Popen(
        [str(script), "ui", "--port", str(port), "--workspace", str(tmp_path / "ws"), "--auth", f"{USER}:{PASSWORD}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                res = httpx.get(f"http://127.0.0.1:{port}/data")
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline, "backprop ui did not start"
                time.sleep(0.5)
        assert res.status_code == 303 and res.headers["location"] == "/login"
        assert _listening_addresses(port) == {"127.0.0.1"}
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert PASSWORD not in err.decode() and f"http://127.0.0.1:{port}/" in err.decode()


@pytest.mark.parametrize("model", ["/etc", "~/models/x", "../models/x", "link"])
def test_model_folders_outside_the_workspace_are_refused(server, tmp_path, model):
    os.symlink(tmp_path, server.workspace / "link")
    client, token = logged_in(server)
    res = client.get("/data", params={"file": "chat.jsonl", "model": model}, headers={"Accept": "text/html"})
    assert res.status_code == 403 and "INPUT_PATH_OUTSIDE_WORKSPACE" in res.text
    form = {"csrf": token, "name": "m", "data": "chat.jsonl", "model": model}
    assert client.post("/train", data=form, headers={"Origin": server.url}).status_code == 403
    assert not (server.workspace / "runs/m").exists()
    client.close()


def test_a_model_folder_inside_the_workspace_is_used(server, tiny_llama):
    shutil.copytree(tiny_llama, server.workspace / "models/mine")
    client, _ = logged_in(server)
    page = client.get("/data", params={"file": "chat.jsonl", "model": "models/mine"}, headers={"Accept": "text/html"})
    assert page.status_code == 200 and "ready to train" in page.text and str(server.workspace) not in page.text
    client.close()


def test_data_is_escaped_in_pages(server):
    row = {
        "messages": [{"role": "user", "content": "<script>alert(1)</script>"}, {"role": "assistant", "content": "<b>x"}]
    }
    (server.workspace / "xss.jsonl").write_text(json.dumps(row) + "\n" + json.dumps(row) + "\n")
    client, _ = logged_in(server)
    page = client.get(
        "/data", params={"file": "xss.jsonl", "model": "tiny-llama"}, headers={"Accept": "text/html"}
    ).text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "<script>alert" not in page and "<b>x" not in page
    client.close()
