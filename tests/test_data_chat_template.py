"""No silent template fallback: chat rows for a model without a chat template are refused
until the user chooses one, and a chosen built-in template says whether its markers are
tokens of the model."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from backpropagate.data import DataConfig, prepare
from backpropagate.errors import InputError
from cli_helpers import run_cli
from conftest import real_tokenizer
from test_data_templates import CONVERSATION, labelled_runs


def without_template(name: str, tmp_path: Path) -> Path:
    """A real tokenizer folder whose tokenizer_config.json has no chat template (a base model)."""
    folder = tmp_path / f"{name}-base"
    shutil.copytree(real_tokenizer(name), folder)
    for path in [folder, *folder.iterdir()]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


CHAT = [{"text": "a raw document"}, {"messages": CONVERSATION}]


@pytest.mark.parametrize(
    "row",
    [
        {"messages": CONVERSATION},
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
        {"instruction": "Say hi", "output": "Hi"},
        {"prompt": "Hi", "chosen": "Hello", "rejected": "Go away"},
        {"prompt": "Hi", "completion": "Hello", "label": True},
    ],
    ids=["messages", "sharegpt", "alpaca", "preference", "kto"],
)
def test_chat_rows_for_a_model_without_template_are_refused(row, tmp_path):
    folder = without_template("qwen2.5-0.5b-instruct", tmp_path)
    data = write_rows(tmp_path / "rows.jsonl", [row])
    with pytest.raises(InputError) as err:
        prepare(data, folder, DataConfig(cache=False))
    assert err.value.code == "INPUT_CHAT_TEMPLATE_MISSING"
    assert f"{data}:1:" in err.value.message
    assert "--chat-template chatml|llama3|FILE" in err.value.message


def test_refusal_names_the_first_chat_row_after_raw_text(tmp_path):
    folder = without_template("qwen2.5-0.5b-instruct", tmp_path)
    data = write_rows(tmp_path / "rows.jsonl", CHAT)
    with pytest.raises(InputError, match=r"rows\.jsonl:2: this messages row needs a chat template"):
        prepare(data, folder, DataConfig(cache=False))


def test_raw_text_rows_need_no_template(tmp_path):
    folder = without_template("qwen2.5-0.5b-instruct", tmp_path)
    ds = prepare(write_rows(tmp_path / "text.jsonl", [{"text": "just text"}]), folder, DataConfig(cache=False))
    assert ds.stats["chat_template"] == "none"
    assert len(ds.input_ids) > 2


def test_chatml_on_a_model_whose_vocabulary_has_its_markers(tmp_path, caplog):
    from transformers import AutoTokenizer

    folder = without_template("qwen2.5-0.5b-instruct", tmp_path)
    data = write_rows(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}])
    with caplog.at_level(logging.INFO, logger="backpropagate"):
        ds = prepare(data, folder, DataConfig(cache=False, chat_template="chatml"))
    assert ds.stats["chat_template"] == "chatml"
    assert ds.stats["template_markers"] == [["<|im_start|>", 1], ["<|im_end|>", 1]]
    assert "are single tokens of this model" in caplog.text
    tok = AutoTokenizer.from_pretrained(folder)
    assert labelled_runs(tok, ds.input_ids, ds.labels) == ["I am a bot.<|im_end|>\n", "It is 4.<|im_end|>\n"]


def test_chatml_on_a_model_without_its_markers_warns(tmp_path, caplog):
    folder = without_template("phi-3-mini", tmp_path)
    data = write_rows(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}])
    with caplog.at_level(logging.WARNING, logger="backpropagate"):
        ds = prepare(data, folder, DataConfig(cache=False, chat_template="chatml"))
    markers = dict(ds.stats["template_markers"])
    assert markers["<|im_start|>"] > 1 and markers["<|im_end|>"] > 1
    assert "are not single tokens of this model" in caplog.text
    assert "<|im_start|>" in caplog.text


def test_llama3_template_on_a_llama3_base_model(tmp_path):
    from transformers import AutoTokenizer

    folder = without_template("llama-3.2-3b-instruct", tmp_path)
    data = write_rows(tmp_path / "chat.jsonl", [{"messages": CONVERSATION[1:]}])
    ds = prepare(data, folder, DataConfig(cache=False, chat_template="llama3"))
    assert all(pieces == 1 for _, pieces in ds.stats["template_markers"])
    tok = AutoTokenizer.from_pretrained(folder)
    assert ds.input_ids[0] == tok.bos_token_id
    assert labelled_runs(tok, ds.input_ids, ds.labels) == ["I am a bot.<|eot_id|>", "It is 4.<|eot_id|>"]


@pytest.mark.parametrize("name", ["chatml", "llama3"])
def test_builtin_templates_render_as_transformers_renders_them(name, tmp_path):
    """The engine's built-in templates give the tokens transformers gives for the same Jinja source."""
    from backpropagate.data import reference as ref

    folder = without_template("llama-3.2-3b-instruct", tmp_path)
    data = write_rows(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}])
    ds = prepare(data, folder, DataConfig(cache=False, chat_template=name))
    reference = ref.ReferenceModel(folder, chat_template=name)
    assert ds.input_ids.tolist() == reference.encode(reference.render(CONVERSATION, False))[0]
    with pytest.raises(InputError) as err:
        ref.ReferenceModel(folder).render(CONVERSATION, False)
    assert err.value.code == "INPUT_CHAT_TEMPLATE_MISSING"


def test_template_file_and_missing_file(tmp_path):
    folder = without_template("qwen2.5-0.5b-instruct", tmp_path)
    template = tmp_path / "mine.jinja"
    template.write_text("{% for m in messages %}<|im_start|>{{ m['role'] }}: {{ m['content'] }}<|im_end|>{% endfor %}")
    data = write_rows(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}])
    ds = prepare(data, folder, DataConfig(cache=False, chat_template=str(template)))
    assert ds.stats["chat_template"] == "file"
    with pytest.raises(InputError) as err:
        prepare(data, folder, DataConfig(cache=False, chat_template=str(tmp_path / "nope.jinja")))
    assert err.value.code == "INPUT_FILE_NOT_FOUND"


def test_template_choice_is_part_of_the_cache_key(tmp_path):
    folder = without_template("qwen2.5-0.5b-instruct", tmp_path)
    data = write_rows(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}])
    chatml = prepare(data, folder, DataConfig(chat_template="chatml"))
    llama3 = prepare(data, folder, DataConfig(chat_template="llama3"))
    again = prepare(data, folder, DataConfig(chat_template="chatml"))
    assert chatml.input_ids.tolist() != llama3.input_ids.tolist()
    assert again.input_ids.tolist() == chatml.input_ids.tolist()


def test_validate_and_train_refuse_with_the_same_code(tiny_qwen2, tmp_path):
    model = tmp_path / "tiny-qwen2-base"
    shutil.copytree(tiny_qwen2, model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    data = write_rows(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}])
    refused = run_cli("validate", str(data), "--model", str(model))
    assert refused.status != 0
    assert "[INPUT_CHAT_TEMPLATE_MISSING]" in refused.stderr + refused.stdout
    chosen = run_cli("validate", str(data), "--model", str(model), "--chat-template", "chatml")
    assert chosen.status == 0, chosen.stderr
    trained = run_cli("train", "--model", str(model), "--data", str(data), "-o", str(tmp_path / "run"), "--steps", "1")
    assert trained.status == refused.status
    assert "[INPUT_CHAT_TEMPLATE_MISSING]" in trained.stderr + trained.stdout
    out = tmp_path / "chosen"
    args = ("--model", str(model), "--data", str(data), "-o", str(out), "--steps", "1", "--no-progress")
    trained = run_cli("train", *args, "--chat-template", "chatml")
    assert trained.status == 0, trained.stderr
    run = json.loads((out / "adapter" / "backpropagate_run.json").read_text())
    assert run["data_config"]["chat_template"] == "chatml"
