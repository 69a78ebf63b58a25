"""Generate text from a GGUF with llama.cpp (the `xllamacpp` bindings).

The last step of the main job: the exported file runs in llama.cpp. A chat prompt is
rendered with the chat template stored in the GGUF (by llama.cpp itself), a raw prompt is
completed as is.
"""

from __future__ import annotations

import json
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backpropagate.errors import InputError, RunFailedError
from backpropagate.export.llama_cpp import load_xllamacpp


@dataclass
class Generation:
    """Generated text and how many tokens the prompt and answer took."""

    text: str
    prompt_tokens: int
    completion_tokens: int


class GGUFModel:
    """A GGUF loaded in llama.cpp, kept open for several generations."""

    def __init__(self, path: str | Path, n_ctx: int = 2048, threads: int | None = None) -> None:
        path = Path(path)
        if not path.is_file():
            raise InputError("INPUT_FILE_NOT_FOUND", f"{path}: no such GGUF file")
        xlc = load_xllamacpp()
        params = xlc.CommonParams()
        params.model.path = str(path)
        params.n_ctx = n_ctx
        params.n_parallel = 1
        params.warmup = False
        params.verbosity = -1
        if threads:
            params.cpuparams.n_threads = threads
        try:
            self._server = xlc.Server(params)
        except Exception as exc:
            raise InputError("INPUT_MODEL_LOAD_FAILED", f"{path}: llama.cpp could not load it ({exc})") from exc
        self.path = path

    def _call(self, method: str, body: dict[str, Any]) -> dict[str, Any]:
        answer = getattr(self._server, method)(body)
        if not isinstance(answer, dict) or "error" in answer:
            raise RunFailedError("RUNTIME_GGUF_EXPORT_FAILED", f"{self.path}: llama.cpp answered {answer!r}")
        return answer

    def chat(self, messages: list[dict[str, str]], max_tokens: int = 128, temperature: float = 0.0) -> Generation:
        """Answers a conversation, rendered with the GGUF's chat template."""
        r = self._call(
            "handle_chat_completions", {"messages": messages, "max_tokens": max_tokens, "temperature": temperature}
        )
        usage = r.get("usage", {})
        text = r["choices"][0]["message"].get("content") or ""
        return Generation(text, usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0))

    def complete(self, prompt: str, max_tokens: int = 128, temperature: float = 0.0) -> Generation:
        """Continues `prompt` as plain text."""
        r = self._call("handle_completions", {"prompt": prompt, "n_predict": max_tokens, "temperature": temperature})
        usage = r.get("usage", {})
        return Generation(r["choices"][0]["text"], usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0))

    def _http(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        # llama.cpp's server listens on loopback; tokenizing and templating live there.
        address = str(self._server.listening_address)
        base = address if address.startswith("http") else f"http://{address}"
        req = urllib.request.Request(
            base + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=60) as resp:
            answer: dict[str, Any] = json.loads(resp.read())
        return answer

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        """Token ids as llama.cpp tokenizes `text` with the GGUF's vocabulary."""
        return [int(t) for t in self._http("/tokenize", {"content": text, "add_special": add_special})["tokens"]]

    def apply_template(self, messages: list[dict[str, str]]) -> str:
        """The prompt llama.cpp renders from `messages` with the GGUF's chat template."""
        return str(self._http("/apply-template", {"messages": messages})["prompt"])

    def top_logprobs(self, prompt: str | list[int], n: int = 5) -> list[tuple[int, float]]:
        """The `n` most likely next tokens after `prompt`, with their log-probabilities.

        The reported probabilities are the model's raw ones; the token actually sampled is
        pinned to a plain letter so that llama.cpp reports them at once (a token ending
        mid-character would hold them back).
        """
        plain = self.tokenize("a", add_special=False)[0]
        r = self._call(
            "handle_completions",
            {
                "prompt": prompt,
                "n_predict": 1,
                "n_probs": n,
                "temperature": 0,
                "post_sampling_probs": False,
                "logit_bias": [[plain, 1000.0]],
            },
        )
        top = r["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
        return [(int(t["id"]), float(t["logprob"])) for t in top]


def generate(
    model: str | Path, prompt: str, max_tokens: int = 128, chat: bool = True, system: str | None = None
) -> Generation:
    """One-shot generation from a GGUF file (chat by default)."""
    m = GGUFModel(model)
    if not chat:
        return m.complete(prompt, max_tokens)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return m.chat(messages, max_tokens)
