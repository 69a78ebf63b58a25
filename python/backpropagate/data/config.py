"""Settings of dataset preparation; each field's help is also its CLI flag's help."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from backpropagate.errors import ConfigError


def _opt(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class DataConfig:
    """How a dataset file becomes packed, masked token rows (see `prepare`)."""

    max_seq_length: int = _opt(2048, "Tokens per packed row; longer samples are truncated or dropped.")
    train_on: Literal["assistant", "all"] = _opt(
        "assistant",
        "Tokens that carry the loss in SFT chat rows: the assistant's turns, or all tokens "
        "(raw text always trains on all; preference and KTO rows on their completions).",
    )
    overlong: Literal["truncate", "drop"] = _opt(
        "truncate", "What to do with a sample longer than max_seq_length: truncate it or drop it (counted)."
    )
    skip_invalid: bool = _opt(False, "Skip bad rows (counted and listed) instead of refusing the file.")
    reasoning_trace: bool = _opt(
        False, "Keep only rows whose answers hold a balanced, non-empty <think>...</think> trace within the token band."
    )
    trace_min_tokens: int = _opt(8, "Fewest trace tokens a row may have (summed over its <think> spans).")
    trace_max_tokens: int = _opt(8192, "Most trace tokens a row may have (summed over its <think> spans).")
    pack: bool = _opt(True, "Pack samples best-fit-decreasing into rows; off gives one sample per row (padded mode).")
    cache: bool = _opt(True, "Reuse the prepared dataset from the on-disk cache when nothing changed.")
    max_errors: int = _opt(20, "How many bad rows an error message lists.")

    def __post_init__(self) -> None:
        choices = {"train_on": ("assistant", "all"), "overlong": ("truncate", "drop")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(
                    "CONFIG_INVALID_SETTING", f"{name}={getattr(self, name)!r}; expected one of {', '.join(allowed)}"
                )
        if self.max_seq_length < 2:
            raise ConfigError("CONFIG_INVALID_SETTING", f"max_seq_length={self.max_seq_length}; must be at least 2")
        if not 0 <= self.trace_min_tokens <= self.trace_max_tokens:
            raise ConfigError(
                "CONFIG_INVALID_SETTING",
                f"trace_min_tokens={self.trace_min_tokens} and trace_max_tokens={self.trace_max_tokens}; "
                "need 0 <= trace_min_tokens <= trace_max_tokens",
            )
        if self.max_errors < 1:
            raise ConfigError("CONFIG_INVALID_SETTING", f"max_errors={self.max_errors}; must be at least 1")

    def engine_settings(self) -> str:
        """The settings the Rust engine reads (all but `cache`), as JSON."""
        settings = asdict(self)
        del settings["cache"]
        return json.dumps(settings)


def field_help(cls: type) -> dict[str, str]:
    """Help text of each field of a config dataclass (for CLI flags)."""
    return {f.name: f.metadata.get("help", "") for f in fields(cls)}
