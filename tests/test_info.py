import json

from cli_helpers import run_cli


def test_info_json_has_the_documented_keys():
    res = run_cli("info", "--json")
    assert res.status == 0
    report = json.loads(res.stdout)
    for key in ("backpropagate", "core", "python", "os", "torch", "cuda", "gpus", "extras", "backends"):
        assert key in report
    assert set(report["backends"]) == {"cuda", "mlx", "cpu"}
    assert report["backends"]["cpu"] is True
    assert isinstance(report["cpu_bf16"], bool)
    assert report["core"] == report["backpropagate"]
    assert isinstance(report["gpus"], list)
    assert "bitsandbytes" in report["extras"]


def test_info_table_runs():
    res = run_cli("info")
    assert res.status == 0 and "backends" in res.stdout and "cpu precision" in res.stdout
