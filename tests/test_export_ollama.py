"""Ollama: chat templates translated to Go templates, and registration through a local
server that follows Ollama's HTTP API (blob upload by digest, then create)."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from conftest import real_tokenizer

TEMPLATES = ["qwen2.5-0.5b-instruct", "llama-3.2-3b-instruct", "phi-3-mini", "smollm2-135m-instruct"]
CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
    ],
]


def _parse(tokens: list[str], pos: int = 0) -> tuple[list[Any], int, str]:
    """Go-template tokens to nodes, up to the `end` / `else ...` that closes the block."""
    nodes: list[Any] = []
    while pos < len(tokens):
        tok, pos = tokens[pos], pos + 1
        if not tok.startswith("{{"):
            nodes.append(("text", tok))
            continue
        action = tok[2:-2].strip()
        if action == "end" or action.startswith("else"):
            return nodes, pos, action
        if action.startswith("if "):
            branches, cond = [], action[3:]
            while True:
                body, pos, stop = _parse(tokens, pos)
                branches.append((cond, body))
                if stop == "end":
                    break
                cond = stop[len("else if ") :] if stop.startswith("else if ") else "true"
            nodes.append(("if", branches))
        elif action.startswith("range "):
            body, pos, _ = _parse(tokens, pos)
            nodes.append(("range", action[len("range ") :], body))
        else:
            nodes.append(("action", action))
    return nodes, pos, ""


def go_render(template: str, data: dict[str, Any]) -> str:
    """Evaluates the Go-template subset the Modelfile uses: if / else if / else, range (also
    `range $i, $_ := ...`), eq / or / and / not / len / slice with parentheses, fields of `.`
    and `$`, and `$var := ...` / `$var = ...`."""
    nodes, _, _ = _parse(re.split(r"({{.*?}})", template, flags=re.S))
    variables: dict[str, Any] = {}

    def value(term: str, dot: dict[str, Any]) -> Any:
        if term in ("true", "false"):
            return term == "true"
        if term.startswith('"') or term.isdigit():
            return json.loads(term)
        if term.startswith("$."):
            return data.get(term[2:])
        if term.startswith("$"):
            return variables[term]
        assert term.startswith("."), term
        return dot.get(term[1:], data.get(term[1:]))

    def nest(tokens: list[str]) -> list[Any]:
        out: list[Any] = []
        while tokens:
            tok = tokens.pop(0)
            if tok == ")":
                return out
            out.append(nest(tokens) if tok == "(" else tok)
        return out

    def call(terms: list[Any], dot: dict[str, Any]) -> Any:
        fn, *rest = terms
        args = [call(a, dot) if isinstance(a, list) else value(a, dot) for a in rest]
        if fn == "eq":
            return args[0] == args[1]
        if fn == "not":
            return not args[0]
        if fn == "or":
            return next((v for v in args if v), args[-1])
        if fn == "and":
            return next((v for v in args if not v), args[-1])
        if fn == "len":
            return len(args[0])
        if fn == "slice":
            return args[0][args[1] :]
        assert not args, terms
        return value(fn, dot)

    def evaluate(expr: str, dot: dict[str, Any]) -> Any:
        return call(nest(re.findall(r'"[^"]*"|[()]|[^\s()]+', expr)), dot)

    def run(body: list[Any], dot: dict[str, Any]) -> str:
        out = ""
        for node in body:
            if node[0] == "text":
                out += node[1]
            elif node[0] == "if":
                out += next((run(b, dot) for cond, b in node[1] if evaluate(cond, dot)), "")
            elif node[0] == "range":
                indexed = re.fullmatch(r"(\$\w+), \$\w+ := (.+)", node[1])
                items = evaluate(indexed.group(2) if indexed else node[1], dot)
                for i, item in enumerate(items):
                    if indexed:
                        variables[indexed.group(1)] = i
                    out += run(node[2], item)
            elif m := re.fullmatch(r"(\$\w+) :?= (.+)", node[1]):
                variables[m.group(1)] = evaluate(m.group(2), dot)
            else:
                out += str(evaluate(node[1], dot))
        return out

    return run(nodes, data)


def ollama_prompt(
    template: str, default_system: str | None, messages: list[dict[str, str]], think: bool | None = None
) -> str:
    """The prompt Ollama's chat endpoint builds: the Modelfile's SYSTEM stands in when the
    conversation does not start with a system message; `.System` joins every system
    message; consecutive messages of one role are merged (Ollama's `collate`)."""
    if default_system and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": default_system}, *messages]
    collated: list[dict[str, str]] = []
    for m in messages:
        if collated and collated[-1]["Role"] == m["role"]:
            collated[-1]["Content"] += "\n\n" + m["content"]
        else:
            collated.append({"Role": m["role"], "Content": m["content"]})
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    data = {"System": system, "Messages": collated, "IsThinkSet": think is not None, "Think": bool(think)}
    return go_render(template, data)


@pytest.mark.parametrize("name", TEMPLATES)
def test_translated_template_renders_like_transformers(name: str) -> None:
    from transformers import AutoTokenizer

    from backpropagate.export.ollama import chat_format

    folder = real_tokenizer(name)
    fmt = chat_format(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    template = fmt.go_template()
    for messages in CONVERSATIONS:
        # No system message, an explicit empty one (kept as an empty block), and a real one.
        for system in (None, "", "Answer in one word."):
            hf_messages = ([{"role": "system", "content": system}] if system is not None else []) + messages
            want = tok.apply_chat_template(hf_messages, tokenize=False, add_generation_prompt=True)
            # llama.cpp and Ollama add BOS when tokenizing, so the template leaves it out.
            bos = tok.bos_token or ""
            adds_bos = tok("x")["input_ids"][:1] == [tok.bos_token_id]
            want = want[len(bos) :] if adds_bos and want.startswith(bos) else want
            assert ollama_prompt(template, fmt.default_system, hf_messages) == want, system
            assert fmt.render(messages, system) == want, system
    assert fmt.stops and all(s in tok.get_vocab() or s in tok.added_tokens_encoder for s in fmt.stops)


DATA = Path(__file__).parent / "data" / "chat_templates"
# family -> (tokenizer folder in shared/, or Gemma's and Qwen3.5's packaged files; the family's published chat
# template in tests/data)
FAMILY_TEMPLATES = {
    "gemma2": ("gemma2", "gemma2.jinja"),
    "gemma3": ("gemma3_text", "gemma3.jinja"),
    "qwen3": ("qwen3", "qwen3.jinja"),
    "smollm3": ("llama-3.2-3b-instruct", "smollm3.jinja"),
    "mistral-small-3.2": ("mixtral-8x22b-v0.1", "mistral-small-3.2.jinja"),
    "mistral-nemo": ("mixtral-8x22b-v0.1", "mistral-nemo.jinja"),
    "qwen3.5": ("qwen3_5_text", "qwen3.5.jinja"),
    "phi4-mini": ("phi4-mini", "phi4-mini.jinja"),
}


def _with_template(tokenizer: Path, template: Path, out: Path) -> Path:
    shutil.copytree(tokenizer, out)
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (out / "tokenizer_config.json").write_text(json.dumps(cfg))
    for f in out.glob("chat_template*"):
        f.unlink()
    (out / "chat_template.jinja").write_text(template.read_text())
    return out


@pytest.mark.parametrize("family", list(FAMILY_TEMPLATES))
def test_family_templates_render_both_ways(family: str, tmp_path: Path) -> None:
    """Gemma 3 (system folded into the first user turn; Gemma 2, which refuses one, the same
    way), Mistral Nemo / v0.3 (into the last one), Qwen3 (thinking off through Ollama's
    `think`), Qwen3.5 (its prompt opens `<think>`), Phi-4-mini, SmolLM3 and Mistral Small:
    every conversation renders like transformers, or the difference is one the translation
    warned about."""
    from transformers import AutoTokenizer

    from backpropagate.export.ollama import chat_format

    tok_name, template_file = FAMILY_TEMPLATES[family]
    if family.startswith("gemma"):
        from test_family_gemma3 import TEXT, gemma_folder

        folder = gemma_folder(tmp_path, {**TEXT, "model_type": tok_name}, DATA / template_file)
    elif family == "qwen3.5":
        from test_family_qwen35 import qwen35_folder

        folder = _with_template(qwen35_folder(tmp_path, multimodal=False), DATA / template_file, tmp_path / "ollama")
    else:
        folder = _with_template(real_tokenizer(tok_name), DATA / template_file, tmp_path / family)
    fmt = chat_format(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    template = fmt.go_template()
    bos = tok.bos_token or ""
    adds_bos = tok("x")["input_ids"][:1] == [tok.bos_token_id]
    thinks: list[bool | None] = [None, False] if fmt.no_think else [None]
    differing = 0
    # Gemma 2's template raises on a system message: there is nothing to compare such a case with.
    systems = (None,) if family == "gemma2" else (None, "", "Answer in one word.")
    for messages in CONVERSATIONS:
        for system in systems:
            for think in thinks:
                hf_messages = ([{"role": "system", "content": system}] if system is not None else []) + messages
                extra = {"enable_thinking": think} if think is not None else {}
                want = tok.apply_chat_template(hf_messages, tokenize=False, add_generation_prompt=True, **extra)
                want = want[len(bos) :] if adds_bos and want.startswith(bos) else want
                got = ollama_prompt(template, fmt.default_system, hf_messages, think)
                assert got == fmt.render(messages, system, think)
                if got != want:
                    differing += 1
                    assert any(f"system message {system!r} and think={think}" in w for w in fmt.warnings), (got, want)
    assert fmt.system_in_first_user == (family in ("gemma2", "gemma3"))
    assert any("refuses system messages" in w for w in fmt.warnings) == (family == "gemma2")
    if family == "gemma2":  # a system message opens the first user turn, as Gemma 3's template puts it
        folded = fmt.render(CONVERSATIONS[0], "Be brief.")
        assert folded.startswith("<start_of_turn>user\nBe brief.\n\n")
        system = [{"role": "system", "content": "Be brief."}]
        assert ollama_prompt(template, fmt.default_system, system + CONVERSATIONS[0]) == folded
    assert fmt.system_in_last_user == (family == "mistral-nemo")
    assert fmt.opens == ("<think>\n" if family == "qwen3.5" else "")
    no_think = {"qwen3": "<think>\n\n</think>\n\n", "qwen3.5": "\n</think>\n\n"}
    assert fmt.no_think == no_think.get(family, "")
    assert (differing > 0) == (family == "smollm3")


class FakeOllama(BaseHTTPRequestHandler):
    """Ollama's documented API: HEAD/POST /api/blobs/<digest>, POST /api/create."""

    blobs: dict[str, int] = {}
    calls: list[tuple[str, str, Any]] = []

    def log_message(self, *args: Any) -> None:
        pass

    def _answer(self, status: int, body: dict[str, Any] | None = None) -> None:
        data = json.dumps(body or {}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_HEAD(self) -> None:
        digest = self.path.removeprefix("/api/blobs/")
        self.calls.append(("HEAD", self.path, None))
        self.send_response(200 if digest in self.blobs else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_POST(self) -> None:
        length = int(self.headers["Content-Length"])
        body = self.rfile.read(length)
        if self.path.startswith("/api/blobs/"):
            digest = self.path.removeprefix("/api/blobs/")
            self.calls.append(("POST", self.path, len(body)))
            if digest != "sha256:" + hashlib.sha256(body).hexdigest():
                return self._answer(400, {"error": "digest mismatch"})
            self.blobs[digest] = len(body)
            return self._answer(201)
        if self.path == "/api/create":
            req = json.loads(body)
            self.calls.append(("POST", self.path, req))
            missing = [d for d in req.get("files", {}).values() if d not in self.blobs]
            if not req.get("model") or missing:
                return self._answer(400, {"error": f"missing blobs {missing}"})
            return self._answer(200, {"status": "success"})
        self._answer(404, {"error": "not found"})


@pytest.fixture
def ollama_server() -> Any:
    FakeOllama.blobs, FakeOllama.calls = {}, []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeOllama)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_export_registers_with_ollama(tiny_qwen2: Path, tmp_path: Path, ollama_server: str) -> None:
    from backpropagate.export import export

    result = export(
        tiny_qwen2,
        "gguf",
        output=tmp_path / "out",
        quantization="q8_0",
        ollama=True,
        ollama_name="tiny:latest",
        ollama_host=ollama_server,
    )
    assert result.ollama is not None and result.ollama.registered
    digest = "sha256:" + hashlib.sha256(result.path.read_bytes()).hexdigest()
    kinds = [(m, p) for m, p, _ in FakeOllama.calls]
    assert kinds == [("HEAD", f"/api/blobs/{digest}"), ("POST", f"/api/blobs/{digest}"), ("POST", "/api/create")]
    create = FakeOllama.calls[-1][2]
    assert create["model"] == "tiny:latest"
    assert create["files"] == {result.path.name: digest}
    assert create["parameters"]["stop"] == ["<|im_end|>"]
    assert create["system"] == "You are a helpful assistant."
    modelfile = (tmp_path / "out" / "Modelfile").read_text()
    assert modelfile.startswith(f"FROM ./{result.path.name}\n")
    assert f'TEMPLATE """{create["template"]}"""' in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile and 'SYSTEM """You are a helpful assistant."""' in modelfile

    # A second export of the same file finds the blob already there and skips the upload.
    FakeOllama.calls.clear()
    export(
        tiny_qwen2,
        "gguf",
        output=tmp_path / "out",
        quantization="q8_0",
        ollama=True,
        ollama_host=ollama_server,
        force=True,
    )
    assert [(m, p.split("/")[2]) for m, p, _ in FakeOllama.calls] == [("HEAD", "blobs"), ("POST", "create")]


def test_no_daemon_leaves_modelfile_and_command(tiny_llama: Path, tmp_path: Path) -> None:
    from backpropagate.errors import DependencyError
    from backpropagate.export import export

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    with pytest.raises(DependencyError) as err:
        export(
            tiny_llama,
            "gguf",
            output=tmp_path / "out",
            quantization="f16",
            ollama=True,
            ollama_host=f"127.0.0.1:{port}",
        )
    e = err.value
    assert e.code == "DEP_OLLAMA_REGISTRATION_FAILED" and e.retryable
    modelfile = tmp_path / "out" / "Modelfile"
    assert modelfile.exists() and f"cd {modelfile.parent} && ollama create" in e.message
    assert list((tmp_path / "out").glob("*.gguf"))


def test_cli_prints_the_manual_command(tiny_llama: Path, tmp_path: Path) -> None:
    from cli_helpers import run_cli

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    import os

    os.environ["OLLAMA_HOST"] = f"http://127.0.0.1:{port}"
    try:
        r = run_cli(
            "export",
            str(tiny_llama),
            "--format",
            "gguf",
            "--quantization",
            "f16",
            "--output",
            str(tmp_path / "o"),
            "--ollama",
            "--ollama-name",
            "mine",
        )
    finally:
        del os.environ["OLLAMA_HOST"]
    assert r.status == 4
    assert "[DEP_OLLAMA_REGISTRATION_FAILED]" in r.stderr and "ollama create mine -f Modelfile" in r.stderr


def test_ollama_export_reuses_the_gguf_already_written(tiny_qwen2: Path, tmp_path: Path, ollama_server: str) -> None:
    """`export gguf` then `export gguf --ollama` into the same folder: registered, not converted again."""
    from backpropagate.errors import StateError
    from backpropagate.export import export

    first = export(tiny_qwen2, "gguf", output=tmp_path / "out", quantization="q8_0")
    before = first.path.stat()
    second = export(
        tiny_qwen2, "gguf", output=tmp_path / "out", quantization="q8_0", ollama=True, ollama_host=ollama_server
    )
    after = second.path.stat()
    assert second.path == first.path
    assert (after.st_ino, after.st_mtime_ns, after.st_size) == (before.st_ino, before.st_mtime_ns, before.st_size)
    assert second.tensor_types == first.tensor_types and second.tensor_types
    assert second.ollama is not None and second.ollama.registered
    digest = "sha256:" + hashlib.sha256(second.path.read_bytes()).hexdigest()
    assert FakeOllama.blobs == {digest: before.st_size}
    assert FakeOllama.calls[-1][2]["files"] == {second.path.name: digest}
    assert (tmp_path / "out" / "Modelfile").exists()

    # A GGUF the same name holds but another source made is still refused.
    (tmp_path / "other").mkdir()
    for item in tiny_qwen2.iterdir():
        (tmp_path / "other" / item.name).write_bytes(item.read_bytes())
    with pytest.raises(StateError) as err:
        export(
            tmp_path / "other", "gguf", output=first.path, quantization="q8_0", ollama=True, ollama_host=ollama_server
        )
    assert err.value.code == "STATE_OUTPUT_EXISTS" and "made with source" in err.value.message
    assert first.path.stat().st_mtime_ns == before.st_mtime_ns
