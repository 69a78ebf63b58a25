"""Ollama: a Modelfile translated from the model's chat template, and registration.

The chat template is translated by rendering it with marker messages and reading off
the text around each role's content (prefix/suffix per role, generation prompt, a default
system prompt), then checked by rendering test conversations both ways. Registration
follows Ollama's HTTP API: `POST /api/blobs/sha256:<digest>` with the raw GGUF, then
`POST /api/create` naming that blob, with the template, system prompt and stop words.
"""

from __future__ import annotations

import hashlib
import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from backpropagate import log
from backpropagate.errors import DependencyError, InputError

DEFAULT_HOST = "http://127.0.0.1:11434"
_S, _U1, _A1, _U2 = "SYSQZX7", "USRQZX1", "ASTQZX1", "USRQZX2"


@dataclass
class ChatFormat:
    """A chat template reduced to the text around each role's content."""

    system_prefix: str
    system_suffix: str
    user_prefix: str
    user_suffix: str
    assistant_prefix: str
    assistant_suffix: str
    default_system: str | None
    stops: list[str]
    # Gemma: no system turn; the system text opens the first user message, then
    # `system_suffix`.
    system_in_first_user: bool = False
    # Mistral: no system turn; the system text opens the last user message, then `system_suffix`.
    system_in_last_user: bool = False
    # Qwen3.5: what the generation prompt opens after the assistant prefix (`<think>\n`).
    opens: str = ""
    # Qwen3: what the generation prompt gains when thinking is turned off (Ollama's `think`).
    no_think: str = ""
    # Known differences from the model's template (tools, dates), said once as warnings.
    warnings: list[str] = field(default_factory=list)

    @property
    def always_system(self) -> bool:
        """The template emits its system block even without a system prompt."""
        return self.default_system == ""

    def render(self, messages: list[dict[str, str]], system: str | None, think: bool | None = None) -> str:
        """What Ollama makes of the Go template (used to check the translation).

        `system` is the conversation's own system message: None when it has none (Ollama
        then puts the Modelfile's SYSTEM, the template's default, in its place), "" for an
        explicit empty one, which the chat template keeps as an empty system block.
        `think` is Ollama's request flag (None: not set).
        """
        shown = system if system is not None else (self.default_system or None)
        block = f"{self.system_prefix}{shown or ''}{self.system_suffix}"
        in_user = self.system_in_first_user or self.system_in_last_user
        out = block if (shown is not None or self.always_system) and not in_user else ""
        first = True
        for i, m in enumerate(messages):
            pre, suf = (
                (self.user_prefix, self.user_suffix)
                if m["role"] == "user"
                else (self.assistant_prefix, self.assistant_suffix)
            )
            opens_here = (first and self.system_in_first_user) or (i == len(messages) - 1 and self.system_in_last_user)
            if m["role"] == "user" and shown is not None and opens_here:
                pre += block
            first = first and m["role"] != "user"
            out += pre + m["content"] + suf
        return out + self.assistant_prefix + self.opens + (self.no_think if think is False else "")

    def go_template(self) -> str:
        """The template in Ollama's Go-template syntax."""
        esc = _go_text
        # No whitespace-trimming markers: the literal text around them is exact.
        system = f"{esc(self.system_prefix)}{{{{ $.System }}}}{esc(self.system_suffix)}"
        if not self.always_system:
            # `.System` is "" both without a system message and with an empty one; only a
            # system message among `.Messages` tells them apart.
            system = f"{{{{ if or $.System $sys }}}}{system}{{{{ end }}}}"
        user = f"{esc(self.user_prefix)}{{{{ .Content }}}}{esc(self.user_suffix)}"
        if self.system_in_first_user:
            user = (
                f"{esc(self.user_prefix)}{{{{ if $first }}}}{system}{{{{ $first = false }}}}{{{{ end }}}}"
                f"{{{{ .Content }}}}{esc(self.user_suffix)}"
            )
        if self.system_in_last_user:  # Ollama's own Mistral template tells the last message so
            user = (
                f"{esc(self.user_prefix)}{{{{ if eq (len (slice $.Messages $i)) 1 }}}}{system}{{{{ end }}}}"
                f"{{{{ .Content }}}}{esc(self.user_suffix)}"
            )
        gen = esc(self.assistant_prefix) + esc(self.opens)
        if self.no_think:
            gen += f"{{{{ if $.IsThinkSet }}}}{{{{ if not $.Think }}}}{esc(self.no_think)}{{{{ end }}}}{{{{ end }}}}"
        return (
            '{{ $sys := false }}{{ $first := true }}{{ range .Messages }}{{ if eq .Role "system" }}{{ $sys = true }}'
            "{{ end }}{{ end }}"
            + ("" if self.system_in_first_user or self.system_in_last_user else system)
            + ("{{ range $i, $_ := .Messages }}" if self.system_in_last_user else "{{ range .Messages }}")
            + f'{{{{ if eq .Role "user" }}}}{user}'
            f'{{{{ else if eq .Role "assistant" }}}}{esc(self.assistant_prefix)}{{{{ .Content }}}}'
            f"{esc(self.assistant_suffix)}"
            "{{ end }}{{ end }}" + gen
        )


def _go_text(text: str) -> str:
    # Literal text in a Go template may not contain the action delimiters.
    return text.replace("{{", '{{ "{{" }}')


def _strip_suffix(text: str, suffix: str) -> str:
    if suffix and not text.endswith(suffix):
        raise ValueError(f"expected {text!r} to end with {suffix!r}")
    return text[: len(text) - len(suffix)] if suffix else text


def _strip_prefix(text: str, prefix: str) -> str:
    if not text.startswith(prefix):
        raise ValueError(f"expected {text!r} to start with {prefix!r}")
    return text[len(prefix) :]


def _common_prefix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def chat_format(tokenizer_dir: Path) -> ChatFormat:
    """Reads the chat template of `tokenizer_dir` as a `ChatFormat`.

    Raises:
        InputError: INPUT_CHAT_TEMPLATE_UNSUPPORTED when the template is missing or is not
            a plain per-message concatenation that Ollama's template can express.
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    if not getattr(tok, "chat_template", None):
        raise InputError("INPUT_CHAT_TEMPLATE_UNSUPPORTED", f"{tokenizer_dir}: the model has no chat template")
    bos = tok.bos_token if getattr(tok, "add_bos_token", False) or _adds_bos(tok) else None

    def render(messages: list[dict[str, str]], gen: bool, **extra: Any) -> str:
        text = str(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen, **extra))
        # llama.cpp and Ollama add BOS when tokenizing; the template text must not repeat it.
        return text[len(bos) :] if bos and text.startswith(bos) else text

    convo = [{"role": "user", "content": _U1}, {"role": "assistant", "content": _A1}, {"role": "user", "content": _U2}]
    try:
        full = render(convo, True)
        # Without a generation prompt some templates append EOS instead; what the two
        # renderings share is the conversation, the rest of `full` is the prompt.
        gen = full[len(_common_prefix(full, render(convo, False))) :]
        user_suffix = _strip_suffix(full[full.index(_U2) + len(_U2) :], gen)
        assistant_prefix = _strip_prefix(full[full.index(_U1) + len(_U1) : full.index(_A1)], user_suffix)
        between = full[full.index(_A1) + len(_A1) : full.index(_U2)]
        lead = full[: full.index(_U1)]
        last_user = refuses_system = False
        try:
            with_sys = render([{"role": "system", "content": _S}, *convo], True)
            at = with_sys.index(_S)
            # Mistral: the system text opens the last user message, after the user prefix.
            last_user = at > with_sys.index(_U1)
            if last_user:
                system_prefix = _strip_prefix(with_sys[with_sys.index(_A1) + len(_A1) : at], between)
                sep = with_sys[at + len(_S) : with_sys.index(_U2)]
            else:
                system_prefix = with_sys[:at]
                sep = with_sys[at + len(_S) : with_sys.index(_U1)]
        except Exception:  # Gemma 2's template raises on a system message
            system_prefix, sep = "", ""
            refuses_system = True
        if between.endswith(lead):
            user_prefix, default_system = lead, None
        else:
            opener = _common_prefix(system_prefix, assistant_prefix)
            cut = sep.rfind(opener) if opener else -1
            if cut >= 0:
                user_prefix = sep[cut:]
            else:
                # Mistral: the user prefix is what follows both a system block and an answer.
                user_prefix = _common_prefix(sep[::-1], between[::-1])[::-1]
                if not user_prefix:
                    raise ValueError("cannot tell the system block from the user prefix")
            inner = _strip_suffix(_strip_prefix(lead, system_prefix), sep)
            default_system = inner
        # Gemma has no system turn: the system text opens the first user message.
        fold = bool(system_prefix) and system_prefix == user_prefix and not sep.endswith(user_prefix)
        if fold:
            system_prefix, system_suffix = "", sep
        elif refuses_system:
            # Ollama still passes a system message: it opens the first user message, as in Gemma 3.
            fold, system_suffix = True, "\n\n"
        elif last_user:
            system_suffix = sep
        else:
            system_suffix = _strip_suffix(sep, user_prefix) if system_prefix else ""
        assistant_suffix = _strip_suffix(between, user_prefix)
        opens = _strip_prefix(gen, assistant_prefix)
        no_think = render(convo, True, enable_thinking=False)
        no_think = no_think[len(full) :] if no_think.startswith(full) else ""
    except ValueError as exc:
        raise InputError(
            "INPUT_CHAT_TEMPLATE_UNSUPPORTED", f"{tokenizer_dir}: chat template is not a per-message format ({exc})"
        ) from exc
    specials = {t.content for t in tok.added_tokens_decoder.values() if t.special} | set(tok.all_special_tokens)
    stops = sorted(t for t in specials if t and t in assistant_suffix)
    if tok.eos_token and tok.eos_token not in stops:
        stops.append(tok.eos_token)
    fmt = ChatFormat(
        system_prefix,
        system_suffix,
        user_prefix,
        user_suffix,
        assistant_prefix,
        assistant_suffix,
        default_system,
        stops,
        system_in_first_user=fold,
        system_in_last_user=last_user,
        opens=opens,
        no_think=no_think,
    )
    source = str(tok.chat_template)
    if "tools" in source:
        fmt.warnings.append(
            "tool definitions, tool calls and tool results are not carried into the Ollama template "
            "(messages are); use llama.cpp, which reads the model's own template, for tool calling"
        )
    if "strftime_now" in source:
        fmt.warnings.append("the template writes today's date; the Ollama template keeps the export's date")
    if refuses_system:
        fmt.warnings.append(
            "the model's template refuses system messages; the Ollama template puts a system message "
            "at the start of the first user message"
        )
    fmt.warnings += _check(fmt, render, tokenizer_dir, refuses_system)
    for warning in fmt.warnings:
        log.get_logger(__name__).warning("Ollama template of %s: %s", tokenizer_dir, warning)
    return fmt


def _adds_bos(tok: Any) -> bool:
    ids = tok("x", add_special_tokens=True)["input_ids"]
    return bool(ids) and tok.bos_token_id is not None and ids[0] == tok.bos_token_id


def _check(fmt: ChatFormat, render: Any, where: Path, refuses_system: bool) -> list[str]:
    """Renders test conversations both ways.

    Plain conversations must match exactly (else INPUT_CHAT_TEMPLATE_UNSUPPORTED); a
    system-message or thinking case that differs is kept in its nearest form and returned
    as a warning, never silently. A template that refuses system messages has none to compare.
    """
    plain: list[list[dict[str, str]]] = [
        [{"role": "user", "content": "Hi there"}],
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
    ]
    q = [{"role": "user", "content": "Q"}]
    cases: list[tuple[list[dict[str, str]], str | None, bool | None]] = [(m, None, None) for m in plain]
    if (fmt.system_prefix or fmt.system_in_first_user or fmt.system_in_last_user) and not refuses_system:
        cases += [(q, "Be brief.", None), (q, "", None)]
    if fmt.no_think:
        cases += [(plain[1], None, False)]
    warnings = []
    for messages, system, think in cases:
        hf_messages = ([{"role": "system", "content": system}] if system is not None else []) + messages
        expected = render(hf_messages, True, **({"enable_thinking": think} if think is not None else {}))
        got = fmt.render(messages, system, think)
        if got == expected:
            continue
        if system is None and think is None:
            raise InputError(
                "INPUT_CHAT_TEMPLATE_UNSUPPORTED",
                f"{where}: translated template renders {got!r} where the model's renders {expected!r}",
            )
        warnings.append(
            f"with system message {system!r} and think={think}, Ollama will render {got!r} where the model's template renders {expected!r}"
        )
    return warnings


def modelfile_text(gguf_name: str, fmt: ChatFormat, system: str | None) -> str:
    """The Modelfile: FROM, TEMPLATE, stop parameters and optional SYSTEM."""
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{fmt.go_template()}"""']
    lines += [f"PARAMETER stop {json.dumps(s)}" for s in fmt.stops]
    sys_text = system if system is not None else fmt.default_system
    if sys_text:
        lines.append(f'SYSTEM """{sys_text}"""')
    return "\n".join(lines) + "\n"


def file_digest(path: Path) -> str:
    """`sha256:<hex>` of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return f"sha256:{h.hexdigest()}"


@dataclass
class OllamaOutcome:
    """How registration went."""

    model: str
    host: str
    registered: bool
    modelfile: Path
    command: str
    message: str = ""


def _request(method: str, url: str, body: bytes | None, headers: dict[str, str], timeout: float) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def register(
    gguf: Path, model: str, fmt: ChatFormat, system: str | None, modelfile: Path, host: str | None = None
) -> OllamaOutcome:
    """Uploads the GGUF as a blob and creates `model` through Ollama's HTTP API.

    Raises:
        DependencyError: DEP_OLLAMA_REGISTRATION_FAILED (retryable) when no daemon answers or
            it refuses; the Modelfile stays on disk and the message holds the command to run.
    """
    host = (host or os.environ.get("OLLAMA_HOST") or DEFAULT_HOST).rstrip("/")
    if "://" not in host:
        host = f"http://{host}"
    command = f"cd {modelfile.parent} && ollama create {model} -f {modelfile.name}"
    outcome = OllamaOutcome(model, host, False, modelfile, command)
    digest = file_digest(gguf)
    try:
        status, _ = _request("HEAD", f"{host}/api/blobs/{digest}", None, {}, 10)
        if status != 200:
            size = gguf.stat().st_size
            with open(gguf, "rb") as f:
                req = urllib.request.Request(
                    f"{host}/api/blobs/{digest}",
                    data=f,
                    method="POST",
                    headers={"Content-Length": str(size), "Content-Type": "application/octet-stream"},
                )
                try:
                    with urllib.request.urlopen(req, timeout=600) as resp:
                        status = resp.status
                except urllib.error.HTTPError as err:
                    status = err.code
            if status not in (200, 201):
                raise OSError(f"blob upload answered HTTP {status}")
        body: dict[str, Any] = {
            "model": model,
            "files": {gguf.name: digest},
            "template": fmt.go_template(),
            "parameters": {"stop": fmt.stops},
            "stream": False,
        }
        sys_text = system if system is not None else fmt.default_system
        if sys_text:
            body["system"] = sys_text
        status, answer = _request(
            "POST", f"{host}/api/create", json.dumps(body).encode(), {"Content-Type": "application/json"}, 600
        )
        if status != 200:
            raise OSError(f"create answered HTTP {status}: {answer[:200]!r}")
    except OSError as exc:  # URLError, refused connections and HTTP failures all land here
        raise DependencyError(
            "DEP_OLLAMA_REGISTRATION_FAILED",
            f"could not register {model!r} with Ollama at {host} ({exc}); the Modelfile is at {modelfile}; "
            f"to finish by hand run: {command}",
        ) from exc
    outcome.registered = True
    outcome.message = f"registered {model} at {host}"
    return outcome
