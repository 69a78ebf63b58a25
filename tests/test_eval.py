"""Evaluation: held-out loss through the training code, scored generations, side-by-side, CI gate, coded errors."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from backpropagate.evaluate import evaluate
from backpropagate.evaluate.metrics import contains, exact_match, normalise, token_f1
from backpropagate.runs.store import RunStore
from cli_helpers import run_cli

ROWS = [
    {"messages": [{"role": "user", "content": f"Say the word {w}."}, {"role": "assistant", "content": f"{w} {w} {w}."}]}
    for w in ("apple", "river", "stone", "cloud", "green", "table", "music", "light")
]
FAST = dict(max_seq_length=128, micro_batch=2, grad_accumulation=1, progress=False, report_to="none")


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("eval-data") / "heldout.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


@pytest.fixture(scope="module")
def trained(tiny_llama: Path, data_file: Path, tmp_path_factory: pytest.TempPathFactory):
    from backpropagate import Trainer

    trainer = Trainer("tiny-llama", output_dir=str(tmp_path_factory.mktemp("eval-run") / "run"), **FAST)
    result = trainer.train(data_file, steps=4)
    return trainer, result


def test_held_out_loss_is_the_token_mean_nll_transformers_computes(tiny_llama, data_file):
    import torch
    from transformers import AutoModelForCausalLM

    from backpropagate.data import DataConfig, prepare

    report = evaluate("tiny-llama", data=data_file, data_config=DataConfig(max_seq_length=128))
    dataset = prepare(data_file, tiny_llama, DataConfig(max_seq_length=128))
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    total, count = 0.0, 0
    for s in range(dataset.num_samples):
        lo, hi = int(dataset.sample_offsets[s]), int(dataset.sample_offsets[s + 1])
        ids = torch.tensor(dataset.input_ids[lo:hi], dtype=torch.long)[None]
        labels = torch.tensor(dataset.labels[lo:hi], dtype=torch.long)[None]
        n = int((labels[0, 1:] != -100).sum())
        with torch.no_grad():
            total += float(model(input_ids=ids, labels=labels).loss) * n
        count += n
    assert report.tokens == count
    assert report.loss == pytest.approx(total / count, rel=1e-4)
    assert report.perplexity == pytest.approx(math.exp(report.loss))
    as_folder = evaluate(str(tiny_llama), data=data_file, data_config=DataConfig(max_seq_length=128))
    assert as_folder.loss == pytest.approx(report.loss)  # a full model folder is the same model


def test_trained_adapter_beats_its_base_and_the_eval_is_recorded(trained, data_file):
    trainer, result = trained
    tuned = trainer.evaluate(data_file)
    base = evaluate("tiny-llama", data=data_file, data_config=trainer.data_config)
    assert tuned.tokens == base.tokens
    assert tuned.loss < base.loss
    assert tuned.evaluated_run_id == result.run_id
    rec = RunStore().get(tuned.eval_run_id)
    assert rec is not None
    assert (rec.command, rec.status, rec.parent_run_id) == ("eval", "completed", result.run_id)
    assert rec.metrics["loss"] == pytest.approx(tuned.loss)
    assert rec.data == str(data_file)


def test_eval_cli_by_run_prefix_vs_base_as_a_table_and_json(trained, data_file):
    _, result = trained
    res = run_cli("eval", result.run_id[:8], "--data", str(data_file), "--vs", "tiny-llama")
    assert res.status == 0, res.stderr
    header, *rows = res.stdout.splitlines()
    assert header.split() == [result.run_id[:8], "tiny-llama"]
    table = {r.split()[0]: r.split()[1:] for r in rows if r.strip()}
    assert float(table["loss"][0]) < float(table["loss"][1])
    assert set(table) == {"loss", "perplexity", "tokens"}
    as_json = json.loads(run_cli("eval", str(result.adapter_dir), "--data", str(data_file), "--json").stdout)
    assert as_json["ok"] is True
    assert as_json["reports"][0]["evaluated_run_id"] == result.run_id


def test_gate_fails_with_a_code_when_the_loss_regresses_and_passes_otherwise(trained, data_file):
    _, result = trained
    passed = run_cli("eval", result.run_id, "--data", str(data_file), "--gate-against", "tiny-llama")
    assert passed.status == 0, passed.stderr
    assert "gate passed" in passed.stdout
    failed = run_cli(
        "eval", "tiny-llama", "--data", str(data_file), "--gate-against", result.run_id, "--max-regression", "0.0001"
    )
    assert failed.status == 5
    assert "[RUNTIME_EVAL_REGRESSION]: held-out loss" in failed.stderr
    tolerant = run_cli(
        "eval", "tiny-llama", "--data", str(data_file), "--gate-against", result.run_id, "--max-regression", "10"
    )
    assert tolerant.status == 0, tolerant.stderr
    as_json = run_cli("eval", "tiny-llama", "--data", str(data_file), "--gate-against", result.run_id, "--json")
    assert as_json.status == 5
    body = json.loads(as_json.stdout)
    assert body["ok"] is False and body["error"]["code"] == "RUNTIME_EVAL_REGRESSION" and body["regression"] > 0


def test_prompts_are_answered_and_scored_against_references(trained, tmp_path):
    _, result = trained
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        json.dumps({"prompt": "Say the word apple.", "reference": "apple apple apple."})
        + "\n"
        + json.dumps({"messages": [ROWS[1]["messages"][0], {"role": "assistant", "content": "river river river."}]})
        + "\n"
        + json.dumps({"prompt": "Say anything."})
        + "\n"
    )
    report = evaluate(result.adapter_dir, prompts=prompts, max_new_tokens=8)
    assert report.loss is None
    assert [s.reference for s in report.samples] == ["apple apple apple.", "river river river.", None]
    assert [s.prompt for s in report.samples] == ["Say the word apple.", "Say the word river.", "Say anything."]
    for sample in report.samples[:2]:
        assert sample.answer
        assert sample.scores["token_f1"] == pytest.approx(token_f1(sample.answer, sample.reference))
    assert report.samples[2].scores == {}
    assert report.scores["exact_match"] == pytest.approx(sum(s.scores["exact_match"] for s in report.samples[:2]) / 2)


def test_answer_metrics_follow_squad_normalisation():
    assert normalise("The  Eiffel Tower!") == "eiffel tower"
    assert exact_match("the Paris.", "paris") == 1.0
    assert exact_match("Paris, France", "Paris") == 0.0
    assert contains("It is Paris, France.", "paris") == 1.0
    assert contains("Parisian food", "paris") == 0.0
    assert token_f1("the cat sat on the mat", "a cat on a mat") == pytest.approx(2 * 0.75 * 1.0 / 1.75)
    assert token_f1("", "") == 1.0 and token_f1("dog", "") == 0.0


@pytest.mark.parametrize(
    ("args", "status", "code"),
    [
        (["no-such-run", "--data", "{data}"], 6, "STATE_RUN_NOT_FOUND"),
        (["tiny-llama", "--data", "{tmp}/missing.jsonl"], 3, "INPUT_FILE_NOT_FOUND"),
        (["{tmp}/empty-folder", "--data", "{data}"], 3, "INPUT_MODEL_LOAD_FAILED"),
        (["{tmp}/broken-adapter", "--data", "{data}"], 3, "INPUT_ADAPTER_INVALID"),
        (["tiny-llama"], 2, "CONFIG_INVALID_SETTING"),
        (["tiny-llama", "--prompts", "{tmp}/bad-prompts.jsonl"], 3, "INPUT_DATASET_VALIDATION_FAILED"),
        (["tiny-llama", "--prompts", "{tmp}/missing.jsonl"], 3, "INPUT_FILE_NOT_FOUND"),
        (["tiny-llama", "--gate-against", "tiny-llama"], 2, "CONFIG_INVALID_SETTING"),
        (["tiny-llama", "--data", "{tmp}/pairs.jsonl"], 3, "INPUT_DATASET_VALIDATION_FAILED"),
        (["failed-run-0001", "--data", "{data}"], 6, "STATE_RUN_OUTPUT_MISSING"),
    ],
)
def test_bad_inputs_are_coded_errors(trained, data_file, tmp_path, args, status, code):
    _, result = trained
    (tmp_path / "empty-folder").mkdir()
    broken = tmp_path / "broken-adapter"
    shutil.copytree(result.adapter_dir, broken)
    (broken / "adapter_model.safetensors").unlink()
    (tmp_path / "bad-prompts.jsonl").write_text('{"prompt": "fine"}\n{"question": "no prompt here"}\n')
    pair = {"prompt": "Pick one.", "chosen": "This one.", "rejected": "That one."}
    (tmp_path / "pairs.jsonl").write_text(json.dumps(pair) + "\n")
    store = RunStore()
    store.start("failed-run-0001", "train", model="tiny-llama")
    store.finish("failed-run-0001", "failed", error_code="RUNTIME_TRAINING_DIVERGED")
    argv = [a.format(data=data_file, tmp=tmp_path) for a in args]
    res = run_cli("eval", *argv)
    assert res.status == status, res.stderr
    assert any(line.startswith(f"[{code}]") for line in res.stderr.splitlines()), res.stderr
    if code == "INPUT_DATASET_VALIDATION_FAILED" and "bad-prompts" in argv[-1]:
        assert "bad-prompts.jsonl:2" in res.stderr
