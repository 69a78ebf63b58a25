"""The training form comes from the same dataclasses as the CLI, and refuses what the CLI refuses."""

from __future__ import annotations

import dataclasses
import re

import pytest

from backpropagate.config import TrainConfig, resolve_settings
from backpropagate.data.config import DataConfig
from backpropagate.errors import ConfigError
from backpropagate.ui.form import UI_MANAGED, form_fields, parse_options
from cli_helpers import run_cli
from ui_support import logged_in, ui_server


def test_every_setting_is_on_the_form_once():
    names = [f.name for f in form_fields("tiny-llama")]
    expected = {f.name for cls in (TrainConfig, DataConfig) for f in dataclasses.fields(cls)} - set(UI_MANAGED)
    assert sorted(names) == sorted(expected) and len(names) == len(set(names))
    kinds = {f.name: f.kind for f in form_fields("tiny-llama")}
    assert kinds["mode"] == "select" and kinds["dora"] == "checkbox" and kinds["lora_r"] == "int"
    assert kinds["learning_rate"] == "float" and kinds["target_modules"] == "text"


def test_presets_fill_the_unset_fields():
    by_name = {f.name: f for f in form_fields("tiny-llama")}
    assert by_name["lora_r"].placeholder == "8" and by_name["learning_rate"].placeholder == "0.002"
    assert {f.name: f for f in form_fields("qwen2.5-7b")}["max_seq_length"].placeholder == "2048"


def test_only_changed_values_become_options():
    fields = form_fields("tiny-llama")
    form = {
        "lora_r": "4",
        "learning_rate": "",
        "mode": "auto",
        "dora": "on",
        "fused_kernels": "on",
        "cuda_graphs": "on",
    }
    form |= {"shared_prompt": "on", "pack": "on", "cache": "on", "micro_batch": "2"}
    assert parse_options(form, fields) == {"lora_r": 4, "dora": True}


def test_a_number_that_does_not_parse_is_a_coded_setting_error():
    with pytest.raises(ConfigError, match=r"\[CONFIG_INVALID_SETTING\]: lora_r='four' is invalid"):
        parse_options({"lora_r": "four"}, form_fields("tiny-llama"))


@pytest.mark.parametrize(
    ("field", "value", "flag"), [("lora_r", "0", "--lora-r"), ("warmup_ratio", "2", "--warmup-ratio")]
)
def test_a_bad_value_shows_the_cli_message_on_the_page(tmp_path, field, value, flag):
    cli = run_cli("train", "--model", "tiny-llama", flag, value)
    cli_line = cli.stderr.splitlines()[0]
    with pytest.raises(ConfigError) as caught:
        resolve_settings("tiny-llama", {field: float(value) if "." in value or field != "lora_r" else int(value)})
    assert cli_line == str(caught.value)
    with ui_server(tmp_path / "ws") as server:
        client, token = logged_in(server)
        form = {"csrf": token, "name": "bad", "data": "chat.jsonl", "model": "tiny-llama", field: value}
        res = client.post("/train", data=form, headers={"Origin": server.url})
        client.close()
    assert res.status_code == 400
    shown = re.search(r'<div class="error" id="error"><b>\[(\w+)\]</b>: (.*?)<br>', res.text)
    assert shown and f"[{shown.group(1)}]: {shown.group(2)}" == cli_line.replace("'", "&#39;")
    assert not (server.workspace / "runs/bad").exists()
