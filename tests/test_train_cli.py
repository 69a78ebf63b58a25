"""`backprop train` and the 3-line API on the example JSONL file."""

import json
from pathlib import Path

import numpy as np

from backpropagate.examples import __file__ as examples_init
from cli_helpers import run_cli

CHAT = Path(examples_init).parent / "chat.jsonl"
# The example file packs into 4 rows of the tiny preset's 512 tokens: one micro-batch holds them all.
FULL_BATCH = dict(learning_rate=1e-2, micro_batch=4, grad_accumulation=1, schedule="constant", report_to="none")


def _falls(losses):
    values = [loss for _, loss in losses]
    return np.mean(values[-3:]) < np.mean(values[:3]) - 0.2


def test_three_line_api_on_jsonl(tiny_qwen2, tmp_path):
    from backpropagate import Trainer

    trainer = Trainer("tiny-qwen2", output_dir=str(tmp_path / "run"), progress=False, **FULL_BATCH)
    result = trainer.train(CHAT, steps=10)
    assert _falls(result.losses), result.losses
    run = json.loads(result.run_file.read_text())
    assert run["data"] == str(CHAT) and run["data_stats"]["rows_used"] == 70
    assert run["command"].startswith(f"backprop train --model tiny-qwen2 --data {CHAT} --steps 10")
    exported = trainer.export("gguf", quantization="q8_0")
    assert exported.path.read_bytes()[:4] == b"GGUF" and exported.path.parent.parent == result.output_dir


def test_cli_trains_on_jsonl_and_the_loss_falls(tiny_llama, tmp_path):
    out = tmp_path / "run"
    res = run_cli(
        "train",
        "--model",
        "tiny-llama",
        "--data",
        str(CHAT),
        "--steps",
        "10",
        "--output",
        str(out),
        "--learning-rate",
        "1e-2",
        "--micro-batch",
        "4",
        "--grad-accumulation",
        "1",
        "--schedule",
        "constant",
        "--train-on",
        "all",
        "--no-progress",
        "--json",
    )
    assert res.status == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["steps"] == 10 and Path(summary["adapter_dir"]) == out / "adapter"
    run = json.loads((out / "adapter" / "backpropagate_run.json").read_text())
    assert _falls(run["losses"]), run["losses"]
    assert run["data_config"]["train_on"] == "all" and run["hyperparameters"]["learning_rate"] == 1e-2
    assert "run_started run_id=" + summary["run_id"] in res.stderr


def test_cli_reports_config_errors_with_codes(tmp_path):
    res = run_cli("train", "--schedule", "zigzag", "--output", str(tmp_path / "x"))
    assert res.status == 2
    assert "[CONFIG_INVALID_SETTING]" in res.stderr and "schedule" in res.stderr
    res = run_cli("train", "--data", str(tmp_path / "missing.jsonl"), "--output", str(tmp_path / "y"))
    assert res.status == 3 and "[INPUT_FILE_NOT_FOUND]" in res.stderr
