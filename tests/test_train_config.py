import dataclasses
from pathlib import Path

import pytest

from backpropagate.cli.options import flag_name
from backpropagate.config import TrainConfig, apply_preset, resolve_settings
from backpropagate.errors import ConfigError
from backpropagate.presets import PRESETS, find_preset
from cli_helpers import run_cli


def test_every_config_field_is_a_train_flag_with_its_doc():
    import typer

    from backpropagate import cli

    cli._register_commands()
    command = typer.main.get_command(cli.app).commands["train"]
    params = {p.name: p for p in command.params}
    from backpropagate.data import DataConfig

    own = {f.name for f in dataclasses.fields(TrainConfig)}
    data_only = [f for f in dataclasses.fields(DataConfig) if f.name not in own]
    for f in dataclasses.fields(TrainConfig) + tuple(data_only):
        param = params[f.name]
        assert flag_name(f.name) in param.opts, f.name
        assert param.help.startswith(f.metadata["help"]), f.name
    assert run_cli("train", "--help").status == 0


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"schedule": "exponential"}, "schedule"),
        ({"micro_batch": 0}, "micro_batch"),
        ({"lora_dropout": 1.5}, "lora_dropout"),
        ({"eval_split": 0.9}, "eval_split"),
        ({"device": "tpu"}, "device"),
        ({"gpu_resume_temp": 95.0}, "gpu_resume_temp"),
        ({"precision": "fp16"}, "precision"),
        ({"backend": "mlx", "precision": "bf16"}, "precision"),
    ],
)
def test_invalid_settings_name_the_field(options, field):
    with pytest.raises(ConfigError) as err:
        TrainConfig(**options).validate()
    assert err.value.code == "CONFIG_INVALID_SETTING"
    assert field in err.value.message


def test_unknown_option_and_unknown_method_are_refused():
    with pytest.raises(ConfigError, match="lora_rank"):
        resolve_settings("tiny-llama", {"lora_rank": 8})
    with pytest.raises(ConfigError, match="method"):
        TrainConfig(method="dpo").validate()


def test_presets_fill_unset_fields_and_yield_to_explicit_ones():
    preset = find_preset("Qwen/Qwen2.5-7B-Instruct")
    assert preset is PRESETS["qwen2.5-7b"]
    filled = apply_preset(TrainConfig(), preset)
    assert (filled.lora_r, filled.lora_alpha, filled.learning_rate, filled.max_seq_length) == (
        preset.lora_r,
        preset.lora_alpha,
        preset.learning_rate,
        preset.max_seq_length,
    )
    mine = apply_preset(TrainConfig(lora_r=64, learning_rate=1e-5, max_seq_length=1024), preset)
    assert (mine.lora_r, mine.lora_alpha, mine.learning_rate, mine.max_seq_length) == (64, 128, 1e-5, 1024)
    no_preset = apply_preset(TrainConfig(), None)
    assert (no_preset.lora_r, no_preset.lora_alpha, no_preset.max_seq_length) == (16, 32, 2048)


def test_trainer_applies_the_tiny_preset(tiny_llama):
    from backpropagate import Trainer

    trainer = Trainer("tiny-llama")
    assert (trainer.config.lora_r, trainer.config.max_seq_length) == (PRESETS["tiny-llama"].lora_r, 512)
    assert Trainer("tiny-llama", lora_alpha=3.0).config.lora_alpha == 3.0


def test_info_lists_presets():
    res = run_cli("info", "--presets", "--json")
    assert res.status == 0
    names = {row["name"] for row in __import__("json").loads(res.stdout)}
    assert {"qwen2.5-7b", "llama-3.2-1b", "llama-3.1-8b", "mistral-7b", "phi-4-mini", "qwen3-4b", "smollm3-3b"} <= names
    assert {"qwen2.5-3b", "qwen2.5-14b", "qwen2.5-32b", "llama-3.2-3b", "tiny-llama", "tiny-qwen2"} <= names


def test_import_stays_light_until_the_trainer_is_used():
    import subprocess
    import sys

    code = (
        "import sys, backpropagate; from backpropagate import Trainer, TrainConfig, TrainResult; "
        "assert 'torch' not in sys.modules, 'torch imported'; print(Trainer.__module__, TrainConfig.__module__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["backpropagate.trainer", "backpropagate.config"]


@pytest.mark.parametrize(
    ("flag", "value", "expected"),
    [
        ("--lora-r", "0", "lora_r=0 is invalid: expected an integer at least 1"),
        ("--learning-rate", "0", "learning_rate=0.0 is invalid: expected a number in (0, 1]"),
        ("--max-seq-length", "0", "max_seq_length=0 is invalid: expected an integer in [2, 1048576]"),
        ("--lora-alpha", "-1", "lora_alpha=-1.0 is invalid: expected a number more than 0"),
        ("--warmup-ratio", "2", "warmup_ratio=2.0 is invalid: expected a number in [0, 1]"),
        ("--lora-dropout", "-0.1", "lora_dropout=-0.1 is invalid"),
        ("--weight-decay", "-0.01", "weight_decay=-0.01 is invalid: expected a number at least 0"),
        ("--micro-batch", "-2", "micro_batch=-2 is invalid: expected an integer at least 1"),
        ("--grad-accumulation", "0", "grad_accumulation=0 is invalid"),
        ("--save-every", "-1", "save_every=-1 is invalid"),
        ("--seed", "-5", "seed=-5 is invalid"),
        ("--trace-min-tokens", "-1", "trace_min_tokens=-1 is invalid"),
        ("--precision", "fp16", "precision='fp16' is invalid: expected one of auto, bf16, fp32"),
    ],
)
def test_explicit_values_are_refused_with_their_range_never_replaced(tiny_llama, tmp_path, flag, value, expected):
    res = run_cli("train", "--model", "tiny-llama", flag, value, "--steps", "1", "--output", str(tmp_path / "out"))
    assert res.status == 2, res.stderr
    assert res.stderr.startswith("[CONFIG_INVALID_SETTING]: " + expected), res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "options",
    [{"lora_r": 0}, {"learning_rate": 0.0}, {"max_seq_length": 0}, {"lora_alpha": 0}, {"micro_batch": 1.5}],
)
def test_api_refuses_falsy_or_wrong_values_instead_of_filling_the_preset(tiny_llama, options):
    from backpropagate import Trainer

    with pytest.raises(ConfigError) as err:
        Trainer("tiny-llama", **options)
    assert err.value.code == "CONFIG_INVALID_SETTING"
    assert next(iter(options)) in err.value.message


def test_steps_and_epochs_are_checked_with_the_same_ranges(tiny_llama, tmp_path):
    for args, expected in ((("--steps", "0"), "steps=0"), (("--epochs", "-1"), "epochs=-1.0")):
        res = run_cli("train", "--model", "tiny-llama", *args, "--output", str(tmp_path / "o"))
        assert res.status == 2 and expected in res.stderr, res.stderr


def test_every_numeric_setting_states_its_range():
    from backpropagate.data import DataConfig

    for cls in (TrainConfig, DataConfig):
        for f in dataclasses.fields(cls):
            if f.type in ("int", "float", "int | None", "float | None"):
                assert f.metadata.get("bounds") is not None, f"{cls.__name__}.{f.name} has no range"
                assert "[" in f.metadata["help"], f.name


def test_validate_resolves_the_sequence_length_train_uses(tiny_llama):
    import json

    from backpropagate import Trainer
    from backpropagate.examples import __file__ as examples_init

    data = str(Path(examples_init).parent / "chat.jsonl")
    for extra in ((), ("--reasoning-trace",), ("--max-seq-length", "300")):
        res = run_cli("validate", data, "--model", "tiny-llama", "--json", *extra)
        report = json.loads(res.stdout)
        options = {"reasoning_trace": True} if extra == ("--reasoning-trace",) else {}
        if extra and extra[0] == "--max-seq-length":
            options = {"max_seq_length": 300}
        assert report["tokens"]["max_seq_length"] == Trainer("tiny-llama", **options).config.max_seq_length
