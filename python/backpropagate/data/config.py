"""Settings of dataset preparation; each field's help is also its CLI flag's help."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Literal

from backpropagate.errors import InputError
from backpropagate.settings import SEQ_LENGTH, at_least, check_fields, invalid, option

# Chat templates the engine ships (rust/data/template.rs).
BUILTIN_TEMPLATES = ("chatml", "llama3")


@dataclass
class DataConfig:
    """How a dataset file becomes packed, masked token rows (see `prepare`)."""

    max_seq_length: int = option(
        2048, "Tokens per packed row; longer samples are truncated or dropped.", bounds=SEQ_LENGTH
    )
    train_on: Literal["assistant", "all"] = option(
        "assistant",
        "Tokens that carry the loss in SFT chat rows: the assistant's turns, or all tokens "
        "(raw text always trains on all; preference and KTO rows on their completions).",
        choices=("assistant", "all"),
    )
    overlong: Literal["truncate", "drop"] = option(
        "truncate",
        "What to do with a sample longer than max_seq_length: truncate it or drop it (counted).",
        choices=("truncate", "drop"),
    )
    skip_invalid: bool = option(False, "Skip bad rows (counted and listed) instead of refusing the file.")
    reasoning_trace: bool = option(
        False, "Keep only rows whose answers hold a balanced, non-empty <think>...</think> trace within the token band."
    )
    trace_min_tokens: int = option(
        8, "Fewest trace tokens a row may have (summed over its <think> spans).", bounds=at_least(0)
    )
    trace_max_tokens: int = option(
        8192, "Most trace tokens a row may have (summed over its <think> spans).", bounds=at_least(1)
    )
    pack: bool = option(True, "Pack samples best-fit-decreasing into rows; off gives one sample per row (padded mode).")
    cache: bool = option(True, "Reuse the prepared dataset from the on-disk cache when nothing changed.")
    max_errors: int = option(20, "How many bad rows an error message lists.", bounds=at_least(1))
    chat_template: str | None = option(
        None,
        "Chat template for a model without its own (or to replace it): chatml, llama3, or a Jinja file. "
        "Unset, chat rows for a model without a template are refused.",
    )

    def __post_init__(self) -> None:
        check_fields(self)
        if self.trace_min_tokens > self.trace_max_tokens:
            raise invalid(
                "trace_min_tokens", self.trace_min_tokens, f"at most trace_max_tokens ({self.trace_max_tokens})"
            )

    def engine_settings(self) -> str:
        """The settings the Rust engine reads (all but `cache`), as JSON; a template file is sent as its text.

        Raises:
            InputError: INPUT_FILE_NOT_FOUND / INPUT_FILE_UNREADABLE for a template file
                that cannot be read.
        """
        settings = asdict(self)
        del settings["cache"]
        settings["chat_template"] = template_source(self.chat_template)
        return json.dumps(settings)


def template_source(choice: str | None) -> str | None:
    """What the engine gets for `chat_template`: a built-in name as is, else the named file's text."""
    if choice is None or choice in BUILTIN_TEMPLATES:
        return choice
    path = Path(choice)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise InputError(
            "INPUT_FILE_NOT_FOUND",
            f"chat_template={choice!r}: no such file (built-in templates: {', '.join(BUILTIN_TEMPLATES)})",
        ) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError("INPUT_FILE_UNREADABLE", f"{path}: cannot read the chat template ({exc})") from exc


def field_help(cls: type) -> dict[str, str]:
    """Help text of each field of a config dataclass (for CLI flags)."""
    return {f.name: f.metadata.get("help", "") for f in fields(cls)}
