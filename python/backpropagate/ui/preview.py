"""Rendered samples with the tokens that carry the loss marked: what the model will learn from.

The same engine run as `validate` with a model (template, tokenize, mask); each sample is
cut into spans of trained / not trained tokens, and each span is decoded with the model's
own tokenizer, so the page shows exactly the text the labels cover.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from backpropagate.data.config import DataConfig
from backpropagate.data.dataset import IGNORE_INDEX
from backpropagate.data.prepare import run_engine
from backpropagate.model_source import resolve_model


def preview(data: Path, model: str, config: DataConfig, samples: int = 3) -> list[list[dict[str, Any]]]:
    """The first `samples` samples as lists of `{"text", "trained"}` spans."""
    from tokenizers import Tokenizer

    tokenizer_json = resolve_model(model) / "tokenizer.json"
    if not tokenizer_json.is_file():
        return []  # nothing to decode the ids with here; the report itself still shows
    out = run_engine(data, model, config, strict=False)
    tokenizer = Tokenizer.from_file(str(tokenizer_json))
    ids, labels, offsets = (np.asarray(out[k]) for k in ("input_ids", "labels", "sample_offsets"))
    rendered = []
    for start, end in zip(offsets[:samples], offsets[1 : samples + 1], strict=False):
        trained = labels[start:end] != IGNORE_INDEX
        # Cut where the trained flag changes.
        cuts = [0, *(np.flatnonzero(np.diff(trained.astype(np.int8))) + 1).tolist(), int(end - start)]
        rendered.append(
            [
                {
                    "text": tokenizer.decode(ids[start + a : start + b].tolist(), skip_special_tokens=False),
                    "trained": bool(trained[a]),
                }
                for a, b in zip(cuts[:-1], cuts[1:], strict=True)
            ]
        )
    return rendered
