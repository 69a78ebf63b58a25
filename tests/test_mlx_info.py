"""`backprop info` reports what the MLX rail can run here (mlx-lm[cpu] is installed for the tests)."""

import json

import pytest

from cli_helpers import run_cli

pytest.importorskip("mlx_lm")


def test_info_reports_the_mlx_rail():
    import mlx.core as mx

    report = json.loads(run_cli("info", "--json").stdout)
    mlx = report["mlx"]
    assert mlx["usable"] is True and report["backends"]["mlx"] is True
    assert mlx["mlx"] == mx.__version__ and mlx["mlx_lm"]
    assert mlx["device"] == ("gpu" if mx.default_device() == mx.gpu else "cpu")
    assert mlx["modes"] == ["lora", "qlora", "full"] and mlx["methods"] == ["sft", "orpo", "simpo"]
    table = run_cli("info").stdout
    assert "mlx rail" in table and "qlora" in table


def test_info_says_when_mlx_cannot_be_used(monkeypatch):
    import backpropagate.train.mlx as rail

    monkeypatch.setattr(rail, "mlx_importable", lambda: False)
    report = json.loads(run_cli("info", "--json").stdout)
    assert report["mlx"]["usable"] is False and report["mlx"]["modes"] == []
    assert "not usable" in run_cli("info").stdout
