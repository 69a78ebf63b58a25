"""Phi-4-mini to GGUF from its config.json as published: `partial_rotary_factor` and the long-rope
factors at the top level (transformers 5 files them under `rope_parameters`), tied embeddings.
llama.cpp must rotate 3/4 of each head, so `phi3.rope.dimension_count` is what decides parity."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from export_models import build_model
from test_export_gguf import assert_top5_like_transformers

pytest.importorskip("xllamacpp")


def published_form(folder: Path) -> dict:
    """Rewrites the saved config.json the way Phi-4-mini-instruct's own is written."""
    config = json.loads((folder / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config.update(
        rope_theta=rope["rope_theta"],
        partial_rotary_factor=rope["partial_rotary_factor"],
        original_max_position_embeddings=rope["original_max_position_embeddings"],
        rope_scaling={"type": "longrope", "short_factor": rope["short_factor"], "long_factor": rope["long_factor"]},
    )
    (folder / "config.json").write_text(json.dumps(config))
    return config


@pytest.mark.parametrize("form", ["transformers", "published"])
def test_llama_cpp_matches_transformers(form: str, tmp_path: Path) -> None:
    from gguf import GGUFReader

    from backpropagate import _core

    folder = build_model("phi4-mini", tmp_path / "phi4-mini")
    if form == "published":
        assert "rope_parameters" not in published_form(folder)
    out = tmp_path / "phi4-mini.gguf"
    _core.convert_to_gguf(str(folder), str(out), "f32")
    reader = GGUFReader(out)
    assert reader.fields["phi3.rope.dimension_count"].contents() == 12  # 0.75 * head_dim 16
    names = {t.name for t in reader.tensors}
    assert "output.weight" not in names and "rope_factors_short.weight" in names
    assert_top5_like_transformers(out, folder)
