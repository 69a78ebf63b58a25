"""End-to-end preparation on the built-in tiny models and the shipped examples."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from backpropagate.data import IGNORE_INDEX, DataConfig, PreparedDataset, prepare
from backpropagate.errors import ConfigError, InputError
from backpropagate.examples import example_path

NO_CACHE = DataConfig(max_seq_length=256, cache=False)


def write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def check_invariants(ds: PreparedDataset) -> None:
    """Structural facts every prepared dataset must satisfy."""
    assert ds.input_ids.dtype == np.int32 and ds.labels.dtype == np.int32
    assert ds.sample_offsets.dtype == np.int64 and ds.pack_offsets.dtype == np.int64
    assert ds.pack_samples.dtype == np.int32 and ds.pair_id.dtype == np.int32
    assert ds.chosen.dtype == np.bool_ and ds.kto_label.dtype == np.int8
    assert ds.sample_offsets[0] == 0 and ds.sample_offsets[-1] == ds.num_tokens
    assert np.all(np.diff(ds.sample_offsets) > 0)
    # Labels are either ignored or the token itself (unshifted).
    target = ds.labels != IGNORE_INDEX
    assert np.array_equal(ds.labels[target], ds.input_ids[target])
    # Every sample sits in exactly one row and rows fit the budget.
    assert sorted(ds.pack_samples.tolist()) == list(range(ds.num_samples))
    lengths = ds.sample_lengths()
    for r in range(ds.num_rows):
        assert lengths[ds.row_samples(r)].sum() <= ds.max_seq_length
    stats = ds.stats
    assert stats["rows_read"] == stats["rows_used"] + sum(stats["dropped"].values())
    assert stats["samples"] == ds.num_samples and stats["tokens"] == ds.num_tokens and stats["rows"] == ds.num_rows


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_qwen2"])
def test_chat_example_mixes_every_sft_shape(model, request):
    ds = prepare(example_path("chat"), request.getfixturevalue(model), NO_CACHE)
    check_invariants(ds)
    assert ds.kind == "sft"
    assert set(ds.stats["formats"]) == {"messages", "sharegpt", "alpaca", "text"}
    assert ds.stats["rows_used"] == ds.stats["rows_read"] == 70
    assert np.all(ds.pair_id == -1) and np.all(ds.kto_label == -1) and not ds.chosen.any()


def test_tokens_match_transformers_apply_chat_template(tiny_llama, tiny_qwen2):
    from transformers import AutoTokenizer

    rows = [json.loads(line) for line in example_path("chat").read_text().splitlines()]
    for model in (tiny_llama, tiny_qwen2):
        tok = AutoTokenizer.from_pretrained(model)
        ds = prepare(example_path("chat"), model, NO_CACHE)
        for s, row in enumerate(rows):
            if "messages" not in row:
                continue
            ref = tok.apply_chat_template(row["messages"], tokenize=True, return_dict=True)["input_ids"]
            got = ds.input_ids[ds.sample_offsets[s] : ds.sample_offsets[s + 1]].tolist()
            assert got == list(ref), f"row {s + 1}"
            # The loss covers exactly the assistant's answer and its end-of-turn token.
            labels = ds.labels[ds.sample_offsets[s] : ds.sample_offsets[s + 1]]
            answer = row["messages"][-1]["content"]
            assert tok.decode([t for t in labels if t != IGNORE_INDEX]).startswith(answer)


def test_preference_pairs_share_a_row(tiny_qwen2):
    ds = prepare(example_path("preference"), tiny_qwen2, NO_CACHE)
    check_invariants(ds)
    assert ds.kind == "preference" and ds.num_samples == 2 * ds.stats["rows_used"]
    assert np.array_equal(ds.pair_id[0::2], ds.pair_id[1::2])
    assert ds.chosen[0::2].all() and not ds.chosen[1::2].any()
    row_of = np.empty(ds.num_samples, dtype=np.int64)
    for r in range(ds.num_rows):
        row_of[ds.row_samples(r)] = r
    assert np.array_equal(row_of[0::2], row_of[1::2])


def test_preference_labels_only_on_completion(tiny_llama):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    ds = prepare(example_path("preference"), tiny_llama, NO_CACHE)
    row = json.loads(example_path("preference").read_text().splitlines()[0])
    for s, side in ((0, "chosen"), (1, "rejected")):
        labels = ds.labels[ds.sample_offsets[s] : ds.sample_offsets[s + 1]]
        assert tok.decode([t for t in labels if t != IGNORE_INDEX]) == row[side] + "<|eot_id|>"


def test_kto_labels(tiny_llama):
    ds = prepare(example_path("kto"), tiny_llama, NO_CACHE)
    check_invariants(ds)
    rows = [json.loads(line) for line in example_path("kto").read_text().splitlines()]
    assert ds.kind == "kto"
    assert ds.kto_label.tolist() == [int(r["label"]) for r in rows]


def test_train_on_all_labels_every_token(tiny_llama):
    ds = prepare(example_path("chat"), tiny_llama, DataConfig(max_seq_length=256, cache=False, train_on="all"))
    assert np.array_equal(ds.labels, ds.input_ids)


def test_unpacked_mode_has_one_sample_per_row(tiny_llama):
    ds = prepare(example_path("chat"), tiny_llama, DataConfig(max_seq_length=256, cache=False, pack=False))
    assert ds.num_rows == ds.num_samples
    assert ds.pack_samples.tolist() == list(range(ds.num_samples))


def test_raw_text_gets_bos_and_eos(tiny_llama):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    ds = prepare(example_path("chat"), tiny_llama, NO_CACHE)
    rows = [json.loads(line) for line in example_path("chat").read_text().splitlines()]
    s = next(i for i, r in enumerate(rows) if "text" in r)
    ids = ds.input_ids[ds.sample_offsets[s] : ds.sample_offsets[s + 1]].tolist()
    assert ids == tok(rows[s]["text"])["input_ids"] + [tok.eos_token_id]


def test_overlong_truncate_and_drop(tmp_path, tiny_llama):
    long = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "word " * 200}]}
    short = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]}
    data = write_jsonl(tmp_path / "d.jsonl", [long, short])
    cut = prepare(data, tiny_llama, DataConfig(max_seq_length=64, cache=False))
    assert cut.stats["truncated"] == 1 and cut.sample_lengths().tolist()[0] == 64
    dropped = prepare(data, tiny_llama, DataConfig(max_seq_length=64, cache=False, overlong="drop"))
    assert dropped.stats["dropped"] == {"overlong": 1} and dropped.num_samples == 1


def test_reasoning_trace_filter(tmp_path, tiny_qwen2):
    def row(answer: str) -> dict:
        return {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": answer}]}

    good = "<think>" + "let me think about it carefully " * 3 + "</think>yes"
    rows = [row(good), row("no trace"), row("<think> </think>x"), row("<think>open"), row("<think>ab</think>x")]
    data = write_jsonl(tmp_path / "t.jsonl", rows)
    ds = prepare(data, tiny_qwen2, DataConfig(max_seq_length=256, cache=False, reasoning_trace=True))
    assert ds.stats["rows_used"] == 1
    assert ds.stats["dropped"] == {"trace_empty": 2, "trace_unbalanced": 1, "trace_too_short": 1}
    trace = ds.stats["trace"]
    assert trace["samples"] == 1 and trace["spans"] == 1 and trace["tokens"] >= 8
    too_long = DataConfig(max_seq_length=256, cache=False, reasoning_trace=True, trace_max_tokens=9)
    with pytest.raises(InputError) as err:
        prepare(data, tiny_qwen2, too_long)
    assert err.value.code == "INPUT_DATASET_EMPTY" and "trace_too_long: 1" in err.value.message


def test_examples_traces_file_passes_the_filter(tiny_llama):
    ds = prepare(example_path("traces"), tiny_llama, DataConfig(max_seq_length=256, cache=False, reasoning_trace=True))
    assert ds.stats["rows_used"] == ds.stats["rows_read"]
    assert ds.stats["trace"]["samples"] == ds.stats["rows_used"]


# ---- bad input -------------------------------------------------------------------------


def test_missing_file(tiny_llama, tmp_path):
    with pytest.raises(InputError) as err:
        prepare(tmp_path / "nope.jsonl", tiny_llama, NO_CACHE)
    assert err.value.code == "INPUT_FILE_NOT_FOUND"


@pytest.mark.parametrize(
    ("line", "code", "words", "reason"),
    [
        ('{"messages": [', "INPUT_DATASET_PARSE_FAILED", "malformed JSON", "parse_error"),
        ("[1, 2]", "INPUT_DATASET_PARSE_FAILED", "not a JSON object", "not_an_object"),
        ('"just a string"', "INPUT_DATASET_PARSE_FAILED", "not a JSON object", "not_an_object"),
        ('{"foo": 1}', "INPUT_DATASET_VALIDATION_FAILED", "no known shape", "unknown_format"),
        (
            '{"messages": [{"role": "user", "content": 5}]}',
            "INPUT_DATASET_VALIDATION_FAILED",
            "messages[0].content",
            "wrong_field_type",
        ),
        (
            '{"messages": [{"role": "robot", "content": "x"}]}',
            "INPUT_DATASET_VALIDATION_FAILED",
            "'robot'",
            "invalid_value",
        ),
        ('{"instruction": "x"}', "INPUT_DATASET_VALIDATION_FAILED", "'output'", "missing_field"),
        ('{"text": 3}', "INPUT_DATASET_VALIDATION_FAILED", "'text'", "wrong_field_type"),
    ],
)
def test_bad_line_is_refused_with_file_and_line(tmp_path, tiny_llama, line, code, words, reason):
    good = json.dumps({"text": "fine row"})
    data = write_jsonl(tmp_path / "bad.jsonl", [good, line, good])
    with pytest.raises(InputError) as err:
        prepare(data, tiny_llama, NO_CACHE)
    assert err.value.code == code
    assert f"{data}:2: " in err.value.message and words in err.value.message
    skipped = prepare(data, tiny_llama, DataConfig(max_seq_length=256, cache=False, skip_invalid=True))
    # Skipped rows keep their reason and line.
    assert skipped.stats["rows_used"] == 2 and skipped.stats["dropped"] == {reason: 1}
    assert skipped.stats["dropped_lines"] == {reason: [2]}
    assert skipped.stats["errors_total"] == 1 and skipped.stats["errors"][0].startswith(f"{data}:2: ")


def test_invalid_utf8_names_the_line(tmp_path, tiny_llama):
    data = tmp_path / "utf.jsonl"
    data.write_bytes(b'{"text": "ok"}\n{"text": "\xff\xfe"}\n')
    with pytest.raises(InputError) as err:
        prepare(data, tiny_llama, NO_CACHE)
    assert err.value.code == "INPUT_DATASET_PARSE_FAILED" and f"{data}:2: invalid UTF-8" in err.value.message


def test_many_bad_lines_listed_with_total(tmp_path, tiny_llama):
    data = write_jsonl(tmp_path / "many.jsonl", ["{oops"] * 30 + [{"text": "x"}])
    with pytest.raises(InputError) as err:
        prepare(data, tiny_llama, DataConfig(cache=False, max_errors=5))
    msg = err.value.message
    assert "30 bad rows of 31 read" in msg and "... and 25 more" in msg
    assert msg.count(f"\n  {data}:") == 5


def test_bom_crlf_blank_lines_and_json_array(tmp_path, tiny_llama):
    data = tmp_path / "crlf.jsonl"
    data.write_bytes(b'\xef\xbb\xbf{"text": "one"}\r\n\r\n{"text": "two"}\r\n')
    ds = prepare(data, tiny_llama, NO_CACHE)
    assert ds.stats["rows_read"] == 2
    arr = tmp_path / "rows.json"
    arr.write_text(json.dumps([{"text": "one"}, {"instruction": "i", "output": "o"}], indent=2))
    ds = prepare(arr, tiny_llama, NO_CACHE)
    assert ds.stats["formats"] == {"text": 1, "alpaca": 1}


def test_parquet(tmp_path, tiny_llama):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in example_path("preference").read_text().splitlines()]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    ds = prepare(tmp_path / "p.parquet", tiny_llama, NO_CACHE)
    ref = prepare(example_path("preference"), tiny_llama, NO_CACHE)
    assert ds.kind == "preference" and np.array_equal(ds.input_ids, ref.input_ids)


def test_mixed_sft_and_preference_is_refused(tmp_path, tiny_llama):
    rows = [
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
        {"prompt": "q", "chosen": "a", "rejected": "b"},
    ]
    data = write_jsonl(tmp_path / "mixed.jsonl", rows)
    with pytest.raises(InputError) as err:
        prepare(data, tiny_llama, NO_CACHE)
    assert err.value.code == "INPUT_DATASET_VALIDATION_FAILED"
    assert f"{data}:2:" in err.value.message and "preference" in err.value.message


def test_empty_file_and_all_dropped(tmp_path, tiny_llama):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(InputError) as err:
        prepare(empty, tiny_llama, NO_CACHE)
    assert err.value.code == "INPUT_DATASET_EMPTY"
    only_user = write_jsonl(tmp_path / "u.jsonl", [{"messages": [{"role": "user", "content": "q"}]}])
    with pytest.raises(InputError) as err:
        prepare(only_user, tiny_llama, NO_CACHE)
    assert err.value.code == "INPUT_DATASET_EMPTY" and "no_labels: 1" in err.value.message


def test_template_failure_names_the_line(tmp_path, tiny_llama):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    cfg["chat_template"] = (
        "{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
        "{{ m.content }}{% endfor %}"
    )
    (model / "tokenizer_config.json").write_text(json.dumps(cfg))
    rows = [
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}]},
    ]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(InputError) as err:
        prepare(data, model, NO_CACHE)
    assert err.value.code == "INPUT_TEMPLATE_RENDER_FAILED" and f"{data}:2: no system role" in err.value.message


def test_missing_tokenizer(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "x"}])
    with pytest.raises(InputError) as err:
        prepare(data, tmp_path, NO_CACHE)
    assert err.value.code == "INPUT_TOKENIZER_LOAD_FAILED"


def test_config_is_checked():
    with pytest.raises(ConfigError):
        DataConfig(train_on="everything")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        DataConfig(trace_min_tokens=10, trace_max_tokens=5)


# ---- cache -----------------------------------------------------------------------------


def test_cache_hit_miss_and_corruption(tmp_path, tiny_llama):
    data = write_jsonl(tmp_path / "d.jsonl", [json.loads(x) for x in example_path("chat").read_text().splitlines()])
    cfg = DataConfig(max_seq_length=256)
    first = prepare(data, tiny_llama, cfg)
    assert first.stats["cache"] == "miss"
    second = prepare(data, tiny_llama, cfg)
    assert second.stats["cache"] == "hit"
    assert isinstance(second.input_ids, np.memmap)
    for name in ("input_ids", "labels", "sample_offsets", "pack_offsets", "pack_samples", "pair_id", "chosen"):
        assert np.array_equal(getattr(first, name), getattr(second, name))
    assert prepare(data, tiny_llama, DataConfig(max_seq_length=128)).stats["cache"] == "miss"
    with data.open("a") as f:
        f.write(json.dumps({"text": "one more"}) + "\n")
    assert prepare(data, tiny_llama, cfg).stats["cache"] == "miss"
    # Flip a byte of a cached array: the entry is detected as corrupt and rebuilt.
    again = prepare(data, tiny_llama, cfg)
    assert again.stats["cache"] == "hit"
    blob = Path(again.stats["cache_dir"]) / "labels.npy"
    del again
    raw = bytearray(blob.read_bytes())
    raw[-1] ^= 0xFF
    blob.write_bytes(bytes(raw))
    rebuilt = prepare(data, tiny_llama, cfg)
    assert rebuilt.stats["cache"] == "rebuilt"
    assert prepare(data, tiny_llama, cfg).stats["cache"] == "hit"


def test_verify_reports_corrupt_cache(tmp_path, tiny_llama):
    from backpropagate import _core
    from backpropagate.errors import StateError

    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "x"}])
    entry = Path(prepare(data, tiny_llama, DataConfig()).stats["cache_dir"])
    json.loads(_core.verify_dataset_cache(str(entry)))
    (entry / "meta.json").write_text("{")
    with pytest.raises(StateError) as err:
        _core.verify_dataset_cache(str(entry))
    assert err.value.code == "STATE_CACHE_CORRUPT"
