"""Logging with a run id on every line, JSON output, and secrets kept off the terminal.

A run binds a UUID with `start_run()`; every record logged afterwards carries it, in
text (`run_id=...`) or JSON form. The CLI passes stdout and stderr through `redact()`
unless verbose output was asked for, so tokens pasted into a config or a folder name
never end up in a shared log. A secret is replaced by `[REDACTED]` in place, which
keeps JSON output valid.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import re
import sys
import time
import uuid
from collections.abc import Iterable, Iterator
from typing import TextIO

LOGGER_NAME = "backpropagate"
_run_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("run_id", default=None)

# Each pattern keeps a visible prefix (group 1) so a reader still sees what was hidden.
# Secrets sit inside paths and names (`runs/run_hf_<token>_x`), where `\b` finds no word
# boundary next to `_`; so the edges are "no letter or digit" instead.
_EDGE = r"(?<![A-Za-z0-9])"
_END = r"(?![A-Za-z0-9])"
# `db_password=` and `HF_TOKEN=` are secrets; a bare `token` only on its own (`eos_token` is not).
_SECRET_KEYS = (
    r"(?:[A-Za-z0-9]+_)*(?:password|passwd|secret|api_?key|(?:hf|access|auth|api|refresh|session)_token)|token"
)
_SECRET_PATTERNS = [
    # The whole credential of an Authorization header, whatever its scheme and spaces.
    re.compile(r"(\bAuthorization\s*[:=]\s*(?:(?:Bearer|Basic|Token|Digest)\s+)?)[^\r\n\"'\\]+", re.IGNORECASE),
    re.compile(r"(\bBearer\s+)[A-Za-z0-9\-._~+/]+=*", re.IGNORECASE),
    re.compile(rf"({_EDGE})sk-[A-Za-z0-9_\-]{{16,}}"),
    re.compile(r"()hf_[A-Za-z0-9]{16,}"),
    re.compile(rf"({_EDGE})(?:AKIA|ASIA)[A-Z0-9]{{16}}{_END}"),
    re.compile(rf"(\b(?:{_SECRET_KEYS})\s*[=:]\s*)[\"']?[^\s\"',;&]+", re.IGNORECASE),
]
REDACTED = "[REDACTED]"


def redact(text: str) -> str:
    """Replaces every known secret shape in `text` with a marker."""
    for pattern in _SECRET_PATTERNS:
        text = pattern.sub(lambda m: m.group(1) + REDACTED, text)
    return text


def redaction_enabled(verbose: bool = False) -> bool:
    """Secrets are hidden unless verbose output or BACKPROPAGATE_DEBUG=1 asks for everything."""
    return not (verbose or os.environ.get("BACKPROPAGATE_DEBUG") == "1")


class RedactingStream:
    """A text stream wrapper that redacts each write (so library warnings are covered too)."""

    def __init__(self, inner: TextIO) -> None:
        self._inner = inner

    def write(self, text: str) -> int:
        """Writes `text` with secrets replaced."""
        self._inner.write(redact(text))
        return len(text)

    def writelines(self, lines: Iterable[str]) -> None:
        """Writes each line with secrets replaced."""
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)


# peft imports bitsandbytes whenever it is installed (on import up to 0.21; from 0.22 when it
# builds or loads adapter modules), and bitsandbytes then tries to fetch an optional CPU
# 4-bit kernel from the hub and warns when it cannot. Adapters and exports
# run nothing in 4-bit, so exactly these records (logger -> message start) are dropped.
_BITSANDBYTES_IMPORT_NOISE = {
    "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward",
    "kernels._internals.hf_hub": "Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes'",
}


def _not_bitsandbytes_import_noise(record: logging.LogRecord) -> bool:
    start = _BITSANDBYTES_IMPORT_NOISE.get(record.name)
    return not (start and record.getMessage().startswith(start))


@contextlib.contextmanager
def quiet_bitsandbytes_import() -> Iterator[None]:
    """Silences bitsandbytes' kernel warnings while a package that imports it in passing (peft) loads."""
    loggers = [logging.getLogger(name) for name in _BITSANDBYTES_IMPORT_NOISE]
    for logger in loggers:
        logger.addFilter(_not_bitsandbytes_import_noise)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(_not_bitsandbytes_import_noise)


def new_run_id() -> str:
    """A fresh run id."""
    return str(uuid.uuid4())


def current_run_id() -> str | None:
    """The run id bound to this context, if a run has started."""
    return _run_id.get()


def start_run(run_id: str | None = None) -> str:
    """Binds a run id to this context and logs `run_started`."""
    rid = run_id or new_run_id()
    _run_id.set(rid)
    get_logger().info("run_started run_id=%s", rid)
    return rid


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        rid = current_run_id()
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        prefix = f"{stamp} {record.levelname.lower():<7}"
        line = f"{prefix} {record.getMessage()}"
        if rid and "run_id=" not in line:
            line += f" run_id={rid}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "run_id": current_run_id(),
        }
        extra = getattr(record, "fields", None)
        if isinstance(extra, dict):
            payload.update(extra)
        return json.dumps(payload, default=str)


def configure(log_format: str = "text", verbose: bool = False, stream: TextIO | None = None) -> None:
    """Sets up the package logger once per process (the CLI calls it; library users may)."""
    logger = get_logger()
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    target = stream or sys.stderr
    if redaction_enabled(verbose) and not isinstance(target, RedactingStream):
        target = RedactingStream(target)
    handler = logging.StreamHandler(target)
    handler.setFormatter(_JsonFormatter() if log_format == "json" else _TextFormatter())
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False


def get_logger(name: str | None = None) -> logging.Logger:
    """The package logger, or a child of it."""
    return logging.getLogger(LOGGER_NAME if not name else f"{LOGGER_NAME}.{name}")
