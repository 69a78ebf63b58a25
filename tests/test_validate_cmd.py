"""`backprop validate`: reports, JSON output and exit statuses."""

from __future__ import annotations

import json

from backpropagate.examples import example_path
from cli_helpers import run_cli


def test_examples_validate_cleanly():
    for name in ("chat", "preference", "kto", "traces"):
        res = run_cli("validate", str(example_path(name)))
        assert res.status == 0, res.stderr
        assert "ok" in res.stdout.splitlines()[-1]
    res = run_cli("validate", str(example_path("chat")), "--json")
    report = json.loads(res.stdout)
    assert report["ok"] and report["formats"] == {"alpaca": 16, "messages": 32, "sharegpt": 16, "text": 6}
    assert report["lengths"]["unit"] == "chars" and sum(b["count"] for b in report["lengths"]["histogram"]) == 70


def test_with_model_reports_tokens_histogram_and_traces(tiny_llama):
    res = run_cli("validate", str(example_path("traces")), "--model", str(tiny_llama), "--reasoning-trace", "--json")
    assert res.status == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["lengths"]["unit"] == "tokens"
    assert report["tokens"]["samples"] == 16 and report["tokens"]["label_tokens"] > 0
    assert report["traces"]["balanced"] == 16 and report["traces"]["tokens"]["samples"] == 16
    text = run_cli("validate", str(example_path("traces")), "--model", str(tiny_llama)).stdout
    assert "tokens per sample" in text and "16 balanced" in text


def test_bad_rows_are_listed_with_lines_and_exit_3(tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "fine"}\n{oops\n{"foo": 1}\n[1]\n', encoding="utf-8")
    res = run_cli("validate", str(data))
    assert res.status == 3
    assert f"{data}:2: malformed JSON" in res.stdout
    assert f"{data}:3: the row has no known shape" in res.stdout
    assert f"{data}:4: the row is an array" in res.stdout
    report = json.loads(run_cli("validate", str(data), "--json").stdout)
    assert report["errors_total"] == 3 and not report["ok"]


def test_dropped_rows_show_with_a_model(tmp_path, tiny_llama):
    data = tmp_path / "long.jsonl"
    rows = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "word " * 300}]}]
    rows.append({"messages": [{"role": "user", "content": "q"}]})
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = json.loads(
        run_cli("validate", str(data), "--model", str(tiny_llama), "--max-seq-length", "64", "--json").stdout
    )
    assert report["tokens"]["dropped"] == {"no_labels": 1} and report["tokens"]["truncated"] == 1


def test_missing_file_and_mixed_kinds(tmp_path):
    res = run_cli("validate", str(tmp_path / "none.jsonl"))
    assert res.status == 3 and res.stderr.startswith("[INPUT_FILE_NOT_FOUND]")
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text('{"text": "a"}\n{"prompt": "p", "chosen": "c", "rejected": "r"}\n')
    res = run_cli("validate", str(mixed), "--json")
    assert res.status == 3
    err = json.loads(res.stdout)["error"]
    assert err["code"] == "INPUT_DATASET_VALIDATION_FAILED" and f"{mixed}:2:" in err["message"]
