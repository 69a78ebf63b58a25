"""Multi-run (continual training, SLAO): the math on known tensors, then real runs of tiny-llama on CPU.

The end-to-end runs go through the CLI as a user would: two runs on the example chat data,
the merged adapter loaded by peft and exported to GGUF, a run interrupted by a real SIGINT
and resumed to the same adapter, and every bad input refused with its code.
"""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from backpropagate.continual import slao
from backpropagate.examples import example_path
from cli_helpers import run_cli

ARGS = ["--steps", "2", "--lora-r", "4", "--lr-decay", "0.5", "--no-progress", "--micro-batch", "1"]


def multi_run(out: Path, *extra: str):
    return run_cli("multi-run", "-d", str(example_path("chat")), "--runs", "2", *ARGS, "-o", str(out), *extra)


def test_orthonormal_rows_span_the_previous_a():
    a = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    a0 = slao.orthonormal_rows(a)
    assert a0.shape == a.shape
    torch.testing.assert_close(a0 @ a0.T, torch.eye(4), atol=1e-5, rtol=0)
    # Projecting A's rows onto the span of A0's rows gives them back: same row space.
    torch.testing.assert_close(a @ a0.T @ a0, a, atol=1e-5, rtol=0)
    # The signs make each basis row lean towards the row of A it comes from.
    assert (torch.diagonal(a0 @ a.T) > 0).all()


def test_merge_formula_on_known_tensors():
    merged = {"l.lora_A.weight": torch.ones(2, 3), "l.lora_B.weight": torch.zeros(3, 2)}
    new = {"l.lora_A.weight": torch.full((2, 3), 5.0), "l.lora_B.weight": torch.full((3, 2), 4.0)}
    out = slao.merge_state(merged, new, 4, "slao")
    torch.testing.assert_close(out["l.lora_A.weight"], new["l.lora_A.weight"])  # A: the new run's
    torch.testing.assert_close(out["l.lora_B.weight"], torch.full((3, 2), 2.0))  # 0 + (4 - 0) / sqrt(4)
    assert slao.merge_state(None, new, 1, "slao")["l.lora_B.weight"].equal(new["l.lora_B.weight"])
    assert slao.merge_state(merged, new, 4, "simple")["l.lora_B.weight"].equal(new["l.lora_B.weight"])


def test_slao_rule_on_hand_made_matrices():
    """Four runs of a rank-2 adapter, expected values worked out by hand from the paper's rules."""
    # Init of run 2: QR of A_ft,1^T = [(3,4,0), (6,8,2)] by Gram-Schmidt: q1 = (3,4,0)/5,
    # (6,8,2) - 10 q1 = (0,0,2), q2 = (0,0,1); R = [[5,10],[0,2]] has a positive diagonal.
    a1 = torch.tensor([[3.0, 4.0, 0.0], [6.0, 8.0, 2.0]])
    b1 = torch.tensor([[2.0, -1.0]])
    init = slao.init_state({"l.lora_A.weight": a1, "l.lora_B.weight": b1}, "slao")
    torch.testing.assert_close(init["l.lora_A.weight"], torch.tensor([[0.6, 0.8, 0.0], [0.0, 0.0, 1.0]]))
    assert init["l.lora_B.weight"].equal(b1)  # B_ft,2^(0) = B_ft,1
    # A row pointing the other way keeps its sign: q1 = (-3,-4,0)/5 (R_11 = 5 > 0).
    flipped = slao.orthonormal_rows(torch.tensor([[-3.0, -4.0, 0.0], [6.0, 8.0, 2.0]]))
    torch.testing.assert_close(flipped, torch.tensor([[-0.6, -0.8, 0.0], [0.0, 0.0, 1.0]]))
    # Merges: A_merge,i = A_ft,i; B_merge,i = B_merge,i-1 + (B_ft,i - B_merge,i-1) / sqrt(i).
    b_ft = [b1, torch.tensor([[4.0, 3.0]]), torch.tensor([[1.0, 3.0]]), torch.tensor([[9.0, -5.0]])]
    expected_b = [
        [2.0, -1.0],  # B_merge,1 = B_ft,1
        [3.414213562, 1.828427125],  # 2 + 2/sqrt(2) = 2 + sqrt(2); -1 + 4/sqrt(2) = -1 + 2 sqrt(2)
        [2.020366712, 2.504835040],  # (2 + sqrt(2)) - (1 + sqrt(2))/sqrt(3); (2 sqrt(2) - 1) + (4 - 2 sqrt(2))/sqrt(3)
        [5.510183356, -1.247582480],  # (previous + 9) / 2; (previous - 5) / 2
    ]
    merged = None
    for run, (b, want) in enumerate(zip(b_ft, expected_b, strict=True), start=1):
        a = torch.full((2, 3), float(run))
        merged = slao.merge_state(merged, {"l.lora_A.weight": a, "l.lora_B.weight": b}, run, "slao")
        assert merged["l.lora_A.weight"].equal(a)
        torch.testing.assert_close(merged["l.lora_B.weight"], torch.tensor([want]), atol=1e-6, rtol=0)


def test_init_state_keeps_b_and_orthonormalises_a():
    previous = {"l.lora_A.weight": torch.randn(3, 8), "l.lora_B.weight": torch.randn(5, 3)}
    init = slao.init_state(previous, "slao")
    assert init["l.lora_B.weight"].equal(previous["l.lora_B.weight"])
    torch.testing.assert_close(init["l.lora_A.weight"] @ init["l.lora_A.weight"].T, torch.eye(3), atol=1e-5, rtol=0)
    assert all(previous[k].equal(v) for k, v in slao.init_state(previous, "simple").items())


def test_split_keeps_order_holds_out_and_replays_earlier_rows(tmp_path):
    from backpropagate.continual import MultiRunConfig
    from backpropagate.continual.tasks import split_tasks

    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(40)))
    tasks = split_tasks([data], MultiRunConfig(runs=2, holdout=0.1, replay=0.5), seed=0)
    first, second = ({json.loads(r)["text"] for r in t.train[: len(t.train) - t.replayed]} for t in tasks)
    assert first | {json.loads(r)["text"] for r in tasks[0].heldout} == {f"row {i}" for i in range(20)}
    assert second | {json.loads(r)["text"] for r in tasks[1].heldout} == {f"row {i}" for i in range(20, 40)}
    assert [len(t.heldout) for t in tasks] == [2, 2]
    replayed = {json.loads(r)["text"] for r in tasks[1].train[-tasks[1].replayed :]}
    assert tasks[1].replayed == 9 and replayed <= first  # half of its 18 rows, from run 1's training rows


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_llama):
    out = tmp_path_factory.mktemp("multi") / "out"
    res = multi_run(out)
    assert res.status == 0, res.stderr
    return out


def test_two_runs_give_one_merged_peft_adapter(finished, tiny_llama):
    plan = json.loads((finished / "multi_run.json").read_text())
    assert plan["status"] == "done" and [r["status"] for r in plan["runs"]] == ["done", "done"]
    assert set(plan["runs"][1]["heldout_losses"]) == {"run-01", "run-02"}
    assert all(math.isfinite(x) for r in plan["runs"] for x in r["heldout_losses"].values())
    # Settings reach every run: rank in each adapter, learning rate decayed per run.
    for run in ("run-01", "run-02"):
        assert json.loads((finished / run / "adapter" / "adapter_config.json").read_text())["r"] == 4
    lrs = [
        json.loads((finished / r / "adapter" / "backpropagate_run.json").read_text())["hyperparameters"][
            "learning_rate"
        ]
        for r in ("run-01", "run-02")
    ]
    assert lrs[1] == pytest.approx(lrs[0] * 0.5)
    # Run 2 started from run 1's B and an orthonormal basis of its A.
    first = load_file(finished / "run-01" / "adapter" / "adapter_model.safetensors")
    second = load_file(finished / "run-02" / "adapter" / "adapter_model.safetensors")
    init = load_file(finished / "run-02" / "init_adapter.safetensors")
    for key, value in init.items():
        if slao.is_lora_a(key):
            torch.testing.assert_close(value @ value.T, torch.eye(4), atol=1e-5, rtol=0)
        else:
            assert value.equal(first[key])
    # The final adapter is the SLAO merge of the two runs.
    final = load_file(finished / "adapter" / "adapter_model.safetensors")
    assert final.keys() == second.keys()
    for key, value in final.items():
        expected = second[key] if slao.is_lora_a(key) else first[key] + (second[key] - first[key]) / math.sqrt(2)
        torch.testing.assert_close(value, expected)
    for name in ("adapter_config.json", "tokenizer.json", "backpropagate_run.json"):
        assert (finished / "adapter" / name).is_file()


def test_history_records_the_multi_run_as_parent_of_its_runs(finished):
    from backpropagate.runs.store import RunStore

    plan = json.loads((finished / "multi_run.json").read_text())
    store = RunStore()
    parent = store.get(plan["run_id"])
    assert parent is not None and parent.command == "multi-run" and parent.status == "completed"
    for run in plan["runs"]:
        child = store.get(run["run_id"])
        assert child is not None and child.command == "train" and child.parent_run_id == plan["run_id"]


def test_merged_adapter_loads_in_peft_and_exports_to_gguf(finished, tiny_llama, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), finished / "adapter")
    loaded = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    final = load_file(finished / "adapter" / "adapter_model.safetensors")
    assert len(loaded) == len(final)
    res = run_cli("export", str(finished / "adapter"), "--format", "gguf", "-o", str(tmp_path / "m.gguf"))
    assert res.status == 0, res.stderr
    from gguf import GGUFReader

    assert len(GGUFReader(tmp_path / "m.gguf").tensors) > 0


def test_resume_after_sigint_in_run_two_gives_the_same_adapter(finished, tmp_path, monkeypatch):
    from backpropagate.train.torch import loop as torch_loop

    calls = {"n": 0}
    original = torch_loop.train_step

    def step_then_interrupt(*args, **kwargs):
        result = original(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:  # run 2's first step (run 1 takes 2): Ctrl-C as a user would press it
            os.kill(os.getpid(), signal.SIGINT)
        return result

    monkeypatch.setattr(torch_loop, "train_step", step_then_interrupt)
    out = tmp_path / "out"
    stopped = multi_run(out)
    assert stopped.status == 130 and "[RUNTIME_INTERRUPTED]" in stopped.stderr and "--resume" in stopped.stderr
    plan = json.loads((out / "multi_run.json").read_text())
    assert [r["status"] for r in plan["runs"]] == ["done", "training"]
    assert json.loads((out / "merged" / "slao.json").read_text())["runs_merged"] == 1
    run1 = (out / "run-01" / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns
    monkeypatch.setattr(torch_loop, "train_step", original)
    resumed = multi_run(out, "--resume")
    assert resumed.status == 0, resumed.stderr
    assert (out / "run-01" / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns == run1  # not redone
    expected = load_file(finished / "adapter" / "adapter_model.safetensors")
    for key, value in load_file(out / "adapter" / "adapter_model.safetensors").items():
        torch.testing.assert_close(value, expected[key], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    ("args", "code", "status"),
    [
        (["-d", str(example_path("chat")), "-d", str(example_path("preference"))], "INPUT_DATASET_MIXED_KINDS", 3),
        (["-d", str(example_path("chat")), "--runs", "40"], "INPUT_DATASET_TOO_FEW_ROWS", 3),
        (["-d", str(example_path("chat")), "--runs", "2", "--samples-per-run", "50"], "INPUT_DATASET_TOO_FEW_ROWS", 3),
        (["-d", str(example_path("chat")), "--runs", "2", "--merge-mode", "average"], "CONFIG_INVALID_SETTING", 2),
        (["-d", str(example_path("chat"))], "CONFIG_INVALID_SETTING", 2),
        (
            ["-d", str(example_path("chat")), "-d", str(example_path("chat")), "--runs", "3"],
            "CONFIG_INVALID_SETTING",
            2,
        ),
        (["-d", str(example_path("chat")), "--runs", "2", "--replay", "1.5"], "CONFIG_INVALID_SETTING", 2),
        (["-d", str(example_path("chat")), "--runs", "2", "--mode", "full"], "CONFIG_INVALID_SETTING", 2),
        (["-d", "no-such-file.jsonl", "--runs", "2"], "INPUT_FILE_NOT_FOUND", 3),
        (["-d", str(example_path("chat")), "--runs", "2", "--resume"], "STATE_MULTI_RUN_NOT_FOUND", 6),
    ],
)
def test_bad_input_is_one_coded_error(args, code, status, tmp_path, tiny_llama):
    res = run_cli("multi-run", *args, "--steps", "1", "-o", str(tmp_path / "out"))
    assert res.status == status, res.stderr
    assert f"[{code}]" in res.stderr and "Traceback" not in res.stderr


def test_an_earlier_multi_run_is_not_replaced_without_resume_or_overwrite(finished):
    res = multi_run(finished)
    assert res.status == 6 and "[STATE_OUTPUT_EXISTS]" in res.stderr


def test_api_refuses_unknown_multi_run_options(tiny_llama):
    from backpropagate import Trainer
    from backpropagate.errors import ConfigError

    with pytest.raises(ConfigError, match="merge_strategy"):
        Trainer("tiny-llama").multi_run(example_path("chat"), runs=2, merge_strategy="slao")
