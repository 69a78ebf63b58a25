"""The Rust engine against its slow Python twin (`backpropagate.data.reference`), with hypothesis."""

from __future__ import annotations

import json
from dataclasses import replace
from functools import cache
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backpropagate import _core
from backpropagate.data import DataConfig, prepare
from backpropagate.data import reference as ref
from backpropagate.errors import InputError

# Text with the characters that matter to the rules: whitespace kinds, think tags, quotes,
# digits, non-ASCII letters and special-token strings.
PIECES = ["hi", " there", "\n", "  ", "\t", "<think>", "</think>", "'s", "42", "é", "中", "<|im_end|>", ".", "?"]
text = st.lists(
    st.one_of(st.sampled_from(PIECES), st.text(alphabet=st.characters(codec="utf-8"), max_size=5)), max_size=8
).map("".join)
role = st.sampled_from(["system", "user", "assistant", "tool", "robot"])
message = st.fixed_dictionaries({"role": role, "content": st.one_of(text, st.integers(), st.none())})
row = st.one_of(
    st.fixed_dictionaries({"messages": st.lists(message, max_size=5)}),
    st.fixed_dictionaries(
        {
            "conversations": st.lists(
                st.fixed_dictionaries({"from": st.sampled_from(["human", "gpt", "system", "alien"]), "value": text}),
                max_size=4,
            )
        }
    ),
    st.fixed_dictionaries(
        {"instruction": text, "output": text}, optional={"input": st.one_of(text, st.none()), "system": text}
    ),
    st.fixed_dictionaries({"text": st.one_of(text, st.integers())}),
    st.fixed_dictionaries({"chosen": text, "rejected": text}, optional={"prompt": text}),
    st.fixed_dictionaries({"prompt": text, "completion": text, "label": st.one_of(st.booleans(), st.integers(0, 1))}),
    st.dictionaries(st.sampled_from(["foo", "bar", "text", "output"]), text, max_size=2),
)


@settings(max_examples=60, deadline=None)
@given(value=row)
def test_detection_matches_reference(value):
    line = json.dumps(value)
    try:
        expected = ref.detect(value)
    except ref.RowError:
        with pytest.raises(InputError) as err:
            _core.detect_row(line)
        assert err.value.code == "INPUT_DATASET_VALIDATION_FAILED"
        return
    got = json.loads(_core.detect_row(line))
    assert got["format"] == expected.format and got["kind"] == expected.kind
    assert got["kto_label"] == expected.kto_label
    specs = [
        {"messages": s.messages, "label_from": s.label_from} if isinstance(s, ref.Chat) else {"text": s.text}
        for s in expected.specs
    ]
    assert got["specs"] == specs


def test_non_objects_are_parse_errors():
    for line in ["[1]", '"x"', "3", "{bad"]:
        with pytest.raises(InputError) as err:
            _core.detect_row(line)
        assert err.value.code == "INPUT_DATASET_PARSE_FAILED"


@settings(max_examples=300, deadline=None)
@given(lengths=st.lists(st.integers(1, 64), max_size=200), capacity=st.integers(64, 200))
def test_packing_matches_reference(lengths, capacity):
    offsets, items = _core.pack_bfd(lengths, capacity)
    assert (offsets, items) == ref.pack_bfd(lengths, capacity)


@settings(max_examples=300, deadline=None)
@given(value=text)
def test_trace_spans_match_reference(work, value):
    data = json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": value}]})
    try:
        inner = ref.trace_spans(value)
        expected = "kept"
    except ref.RowError as err:
        inner, expected = [], str(err)
    model = tiny_model("tiny-qwen2")
    config = DataConfig(max_seq_length=4096, cache=False, reasoning_trace=True, trace_min_tokens=0, skip_invalid=True)
    path = write(work, "trace.jsonl", data + "\n")
    try:
        ds = prepare(path, model, config)
    except InputError as err:
        assert err.code == "INPUT_DATASET_EMPTY"
        assert expected != "kept" and f"{expected}: 1" in err.message
        return
    assert expected == "kept", value
    assert ds.stats["trace"]["spans"] == len(inner)


# ---- the whole pipeline ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("parity")


def write(folder: Path, name: str, content: str) -> Path:
    path = folder / name
    path.write_text(content, encoding="utf-8")
    return path


@cache
def tiny_model(name: str) -> Path:
    from backpropagate.tiny import ensure_tiny_model

    return ensure_tiny_model(name)


@cache
def reference_model(name: str) -> ref.ReferenceModel:
    return ref.ReferenceModel(tiny_model(name))


chat_text = st.lists(
    st.sampled_from(["The", " capital", " of", " France", " is", " Paris", ".", "\n", " 42", "'s", " é"]),
    min_size=1,
    max_size=12,
).map("".join)
turn = st.tuples(chat_text, chat_text)
conversation = st.builds(
    lambda system, turns: {
        "messages": ([{"role": "system", "content": system}] if system else [])
        + [m for q, a in turns for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
    },
    st.one_of(st.none(), chat_text),
    st.lists(turn, min_size=1, max_size=3),
)
sft_row = st.one_of(
    conversation,
    st.builds(
        lambda q, a: {"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]},
        chat_text,
        chat_text,
    ),
    st.builds(lambda i, o: {"instruction": i, "output": o}, chat_text, chat_text),
    st.builds(lambda t: {"text": t}, chat_text),
)
pref_row = st.builds(lambda p, c, r: {"prompt": p, "chosen": c, "rejected": r}, chat_text, chat_text, chat_text)
kto_row = st.builds(lambda p, c, lab: {"prompt": p, "completion": c, "label": lab}, chat_text, chat_text, st.booleans())
dataset = st.one_of(
    st.lists(sft_row, min_size=1, max_size=8),
    st.lists(pref_row, min_size=1, max_size=6),
    st.lists(kto_row, min_size=1, max_size=6),
)
configs = st.builds(
    lambda n, on, over, pack: DataConfig(max_seq_length=n, train_on=on, overlong=over, pack=pack, cache=False),
    st.sampled_from([24, 48, 96, 512]),
    st.sampled_from(["assistant", "all"]),
    st.sampled_from(["truncate", "drop"]),
    st.booleans(),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=dataset, config=configs, model=st.sampled_from(["tiny-llama", "tiny-qwen2"]))
def test_pipeline_matches_reference(work, rows, config, model):
    lines = [json.dumps(r) for r in rows]
    expected = ref.prepare_reference(lines, reference_model(model), config)
    path = write(work, "rows.jsonl", "\n".join(lines) + "\n")
    if expected.bad_lines:
        # Refused by default, naming the bad lines; skip_invalid then counts them.
        with pytest.raises(InputError) as err:
            prepare(path, tiny_model(model), config)
        assert err.value.code == "INPUT_DATASET_VALIDATION_FAILED"
        assert all(f"{path}:{line}: " in err.value.message for line in expected.bad_lines)
        config = replace(config, skip_invalid=True)
    if not expected.samples:
        with pytest.raises(InputError) as err:
            prepare(path, tiny_model(model), config)
        assert err.value.code == "INPUT_DATASET_EMPTY"
        return
    ds = prepare(path, tiny_model(model), config)
    assert ds.kind == expected.kind
    assert ds.stats["dropped"] == expected.dropped and ds.stats["formats"] == expected.formats
    for name, array in expected.arrays().items():
        assert np.array_equal(getattr(ds, name), array), name
