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


def _chat(answer: str) -> dict:
    return {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": answer}]}


def test_dropped_rows_are_listed_by_reason_with_their_lines(tmp_path, tiny_llama):
    data = tmp_path / "drops.jsonl"
    rows = [_chat("short"), _chat("word " * 300), {"messages": [{"role": "user", "content": "q"}]}, _chat("x " * 300)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["validate", str(data), "--model", str(tiny_llama), "--max-seq-length", "64", "--overlong", "drop"]
    report = json.loads(run_cli(*args, "--json").stdout)
    assert report["ok"] and report["dropped"] == {"no_labels": 1, "overlong": 2}
    assert report["dropped_lines"] == {"no_labels": [3], "overlong": [2, 4]}
    text = run_cli(*args).stdout
    assert "dropped: no_labels 1, overlong 2" in text
    assert f"first lines: no_labels at {data}:3; overlong at {data}:2, {data}:4" in text
    # --max-errors caps the lines kept per reason; the counts stay whole.
    capped = json.loads(run_cli(*args, "--json", "--max-errors", "1").stdout)
    assert capped["dropped"]["overlong"] == 2 and capped["dropped_lines"]["overlong"] == [2]
    assert f"overlong at {data}:2, ..." in run_cli(*args, "--max-errors", "1").stdout


def test_every_dropped_row_keeps_its_reason_with_a_model(tmp_path, tiny_llama):
    data = tmp_path / "all_dropped.jsonl"
    rows = [{"messages": [{"role": "user", "content": "q"}]}, _chat("word " * 300)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = run_cli("validate", str(data), "--model", str(tiny_llama), "--max-seq-length", "64", "--overlong", "drop")
    assert res.status == 3
    assert res.stderr.splitlines()[0] == (
        f"[INPUT_DATASET_EMPTY]: {data}: none of its 2 rows is usable "
        f"(dropped: no_labels: 1 ({data}:1); overlong: 1 ({data}:2))"
    )


def test_skip_invalid_keeps_each_reason_and_line(tmp_path, tiny_llama):
    data = tmp_path / "mixed_bad.jsonl"
    lines = [
        '{"text": "fine"}',
        "{oops",
        "[1]",
        '{"foo": 1}',
        '{"text": 3}',
        '{"instruction": "x"}',
        '{"messages": [{"role": "robot", "content": "x"}]}',
        '{"text": "also fine"}',
    ]
    data.write_text("\n".join(lines) + "\n")
    expected = {
        "parse_error": [2],
        "not_an_object": [3],
        "unknown_format": [4],
        "wrong_field_type": [5],
        "missing_field": [6],
        "invalid_value": [7],
    }
    for extra in ([], ["--model", str(tiny_llama)]):
        res = run_cli("validate", str(data), "--skip-invalid", "--json", *extra)
        assert res.status == 0, res.stdout
        report = json.loads(res.stdout)
        assert report["dropped_lines"] == expected
        assert report["dropped"] == {reason: 1 for reason in expected}
    refused = json.loads(run_cli("validate", str(data), "--json").stdout)
    assert refused["error"]["code"] == "INPUT_DATASET_PARSE_FAILED" and refused["errors_total"] == 6


def test_train_log_names_the_first_dropped_lines(tmp_path, tiny_llama):
    data = tmp_path / "drops.jsonl"
    rows = [_chat("short"), _chat("word " * 300), _chat("fine"), _chat("x " * 300)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = run_cli(
        "train",
        "--model",
        str(tiny_llama),
        "--data",
        str(data),
        "--steps",
        "1",
        "--max-seq-length",
        "64",
        "--overlong",
        "drop",
        "--no-progress",
        "-o",
        str(tmp_path / "run"),
    )
    assert res.status == 0, res.stderr
    assert f"data: 2 of 4 rows used; 2 dropped (overlong: 2); first lines: overlong at {data}:2, {data}:4" in res.stderr


def test_trace_drops_are_listed_with_their_lines(tmp_path, tiny_llama):
    data = tmp_path / "traces.jsonl"
    answers = ["<think>first check the sum</think>4", "4", "<think>open but never closed 4", "<think>ok</think>yes"]
    data.write_text("".join(json.dumps(_chat(a)) + "\n" for a in answers))
    args = ["validate", str(data), "--model", str(tiny_llama), "--reasoning-trace", "--trace-min-tokens", "0"]
    report = json.loads(run_cli(*args, "--json").stdout)
    assert report["ok"] and report["dropped"] == {"trace_empty": 1, "trace_unbalanced": 1}
    assert report["dropped_lines"] == {"trace_empty": [2], "trace_unbalanced": [3]}
