"""Runs, export and chat through the UI's HTTP endpoints, on a real tiny-llama run."""

from __future__ import annotations

import re
import time

import httpx
import pytest

from test_export_ollama import FakeOllama, ollama_server  # noqa: F401 (the fixture)
from ui_support import logged_in, ui_server

pytestmark = pytest.mark.slow
FLAGS_ON = {"fused_kernels": "on", "cuda_graphs": "on", "shared_prompt": "on", "pack": "on", "cache": "on"}


def wait_json(client: httpx.Client, path: str, done, timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        body = client.get(path).json()
        if done(body):
            return body
        assert time.monotonic() < deadline, f"timed out on {path}: {body}"
        time.sleep(0.5)


def test_train_export_gguf_with_ollama_and_chat(tmp_path, ollama_server, monkeypatch):  # noqa: F811
    monkeypatch.setenv("OLLAMA_HOST", ollama_server)
    with ui_server(tmp_path / "ws") as server:
        client, token = logged_in(server)
        headers = {"X-CSRF-Token": token, "Origin": server.url}
        form = {"csrf": token, "name": "small", "data": "chat.jsonl", "model": "tiny-llama", "steps": "3"}
        form |= FLAGS_ON | {"max_seq_length": "128", "grad_accumulation": "1", "lora_r": "4"}
        assert client.post("/train", data=form, headers={"Origin": server.url}).status_code == 303
        assert server.workspace.joinpath("runs/small/ui-run.json").is_file()
        # A second run trains at the same time, with another rank.
        other = form | {"name": "other", "lora_r": "2", "steps": "2"}
        assert client.post("/train", data=other, headers={"Origin": server.url}).status_code == 303
        # A run's name is taken while it exists; a running run cannot be started again.
        res = client.post("/train", data=form, headers={"Origin": server.url})
        assert res.status_code == 409 and "STATE_OUTPUT_EXISTS" in res.text
        res = client.post("/runs/small/resume", headers=headers)
        assert res.status_code == 409 and res.json()["error"]["code"] == "STATE_OUTPUT_EXISTS"
        # No adapter before the run ends.
        early = client.post("/runs/small/export", json={"format": "gguf"}, headers=headers)
        assert early.status_code == 400 and early.json()["error"]["code"] == "INPUT_ADAPTER_INVALID"

        status = wait_json(client, "/runs/small/state", lambda s: s["state"] != "running")
        assert status["state"] == "finished" and status["step"] == 3, status
        assert status["summary"]["steps"] == 3 and status["run_id"]
        assert [m["step"] for m in client.get("/runs/small/metrics").json()] == [1, 2, 3]
        assert client.get("/runs/small/loss.png").headers["content-type"] == "image/png"
        assert (
            'id="loss-plot" src="/runs/small/loss.png"'
            in client.get("/runs/small", headers={"Accept": "text/html"}).text
        )

        other_status = wait_json(client, "/runs/other/state", lambda s: s["state"] != "running")
        assert other_status["state"] == "finished" and other_status["step"] == 2
        compare = client.get("/runs/compare", params={"a": "small", "b": "other"}, headers={"Accept": "text/html"}).text
        assert re.search(r'<tr class="differs"><th>lora_r</th><td>4</td><td>2</td></tr>', compare)
        assert re.search(r'<tr class=""><th>max_seq_length</th><td>128</td><td>128</td></tr>', compare)

        # The Runs page reads the run history (the store behind `backprop runs`), filtered.
        from backpropagate.runs.store import RunStore

        record = RunStore().get(status["run_id"])
        assert record is not None and record.status == "completed"
        assert status["run_id"][:8] in client.get("/runs", params={"state": "completed"}).text
        assert "small" not in client.get("/runs", params={"state": "failed"}).text
        assert "small" not in client.get("/runs", params={"q": "no-such-run"}).text

        # The settings the form set reached the worker: rank 4 in the adapter's config.
        adapter_config = (server.workspace / "runs/small/adapter/adapter_config.json").read_text()
        assert '"r": 4' in adapter_config

        res = client.post(
            "/runs/small/export", json={"format": "gguf", "quantization": "q4_k_m", "ollama": True}, headers=headers
        )
        assert res.status_code == 200
        job = wait_json(client, "/runs/small/export", lambda b: b["export"]["state"] != "running")["export"]
        assert job["state"] == "done" and job["error"] is None, job
        assert job["path"].endswith("-q4_k_m.gguf") and job["total"] > 0 and job["done"] == job["total"]
        assert ("POST", "/api/create") in [(m, p) for m, p, _ in FakeOllama.calls]

        res = client.post("/runs/small/export", json={"format": "gguf", "quantization": "q3_bogus"}, headers=headers)
        job = wait_json(client, "/runs/small/export", lambda b: b["export"]["state"] != "running")["export"]
        assert job["state"] == "failed" and job["error"]["code"] == "CONFIG_INVALID_SETTING"

        res = client.post(
            "/runs/small/chat",
            json={"gguf": job_path(server), "messages": [{"role": "user", "content": "What is 4 times 3?"}]},
            headers=headers,
        )
        assert res.status_code == 200 and res.json()["ok"] and res.json()["tokens"] >= 1

        client.close()


def job_path(server) -> str:
    return next(p.relative_to(server.workspace).as_posix() for p in server.workspace.rglob("*-q4_k_m.gguf"))
