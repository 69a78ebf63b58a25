"""Example datasets shipped with the package: what the built-in default trains on.

`chat.jsonl` mixes every supported SFT shape (OpenAI messages, ShareGPT, Alpaca, raw
text); `preference.jsonl`, `kto.jsonl` and `traces.jsonl` feed the preference and
reasoning-trace methods.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

EXAMPLES_DIR = Path(__file__).parent


def example_path(name: str = "chat") -> Path:
    """Path of a shipped example file (`chat`, `preference`, `kto`, `traces`)."""
    return EXAMPLES_DIR / f"{name}.jsonl"


def example_texts() -> Iterator[str]:
    """Every string in the shipped examples, for training the tiny tokenizers."""
    for path in sorted(EXAMPLES_DIR.glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            yield from _strings(json.loads(line))


def _strings(value: object) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)
