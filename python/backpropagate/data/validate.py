"""`validate`: what a dataset file holds and what is wrong with it, before any training.

Without a model the check is structural (formats, bad rows with file:line, reasoning-trace
tags, text lengths in characters). With a model it also runs the real preparation, without
refusing anything, to report token lengths, loss tokens, packing and every dropped row (by
reason, with its first lines). Either way the report carries the refusal training would give.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from backpropagate import _core
from backpropagate.data.config import DataConfig
from backpropagate.data.prepare import run_engine, source_bytes
from backpropagate.errors import from_code


def validate(data: str | Path, model: str | Path | None = None, config: DataConfig | None = None) -> dict[str, Any]:
    """Builds the validation report of `data` (see module docstring); `ok` says whether it can train.

    When training would refuse the file, `error` holds that refusal (`BackpropagateError.to_dict()`,
    the same code `train` gives) and `ok` is False.

    Raises:
        InputError: the file is missing or unreadable, not UTF-8, or mixes SFT, preference and KTO rows.
    """
    config = config or DataConfig()
    path = Path(data)
    raw = source_bytes(path)
    found = json.loads(_core.scan_dataset(str(path), config.max_errors, raw, config.skip_invalid))
    stats = found["stats"]
    refusal = found["refusal"]
    report: dict[str, Any] = {
        "file": str(path),
        "kind": stats["kind"],
        "rows_read": stats["rows_read"],
        "rows_valid": stats["rows_used"],
        "formats": stats["formats"],
        "errors": stats["errors"],
        "errors_total": stats["errors_total"],
        "dropped": stats["dropped"],
        "dropped_lines": stats["dropped_lines"],
        "traces": found["traces"],
        "lengths": length_summary(np.asarray(found["lengths"], dtype=np.int64), "chars"),
    }
    if model is not None:
        out = run_engine(path, model, config, strict=False)
        prepared = json.loads(out["stats_json"])
        lengths = np.diff(out["sample_offsets"])
        report["model"] = str(model)
        report["lengths"] = length_summary(lengths, "tokens")
        report["tokens"] = {
            key: prepared[key]
            for key in (
                *("rows_used", "dropped", "samples", "tokens", "label_tokens"),
                *("rows", "truncated", "fill", "system_left_out"),
            )
        }
        report["tokens"]["max_seq_length"] = config.max_seq_length
        report["tokens"]["chat_template"] = prepared["chat_template"]
        report["tokens"]["template_markers"] = prepared["template_markers"]
        if prepared.get("trace") is not None:
            report["traces"]["tokens"] = prepared["trace"]
        # Template failures and token-level drops only show with a model.
        for key in ("errors", "errors_total", "dropped", "dropped_lines"):
            report[key] = prepared[key]
        refusal = out["refusal"]
    report["error"] = from_code(*refusal).to_dict() if refusal else None
    report["ok"] = refusal is None
    return report


def length_summary(lengths: np.ndarray, unit: str) -> dict[str, Any]:
    """Count, spread and a power-of-two histogram of sample lengths (long tails stay readable)."""
    if lengths.size == 0:
        return {"unit": unit, "count": 0, "histogram": []}
    edges = [0, 32]
    while edges[-1] <= lengths.max():
        edges.append(edges[-1] * 2)
    counts, _ = np.histogram(lengths, bins=edges)
    return {
        "unit": unit,
        "count": int(lengths.size),
        "min": int(lengths.min()),
        "mean": round(float(lengths.mean()), 1),
        "p50": int(np.percentile(lengths, 50)),
        "p95": int(np.percentile(lengths, 95)),
        "max": int(lengths.max()),
        "histogram": [
            {"from": int(a), "to": int(b) - 1, "count": int(c)}
            for a, b, c in zip(edges[:-1], edges[1:], counts, strict=True)
        ],
    }
