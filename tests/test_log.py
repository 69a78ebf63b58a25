import io
import json
import logging
import uuid

import pytest

from backpropagate import cli, log
from cli_helpers import run_cli

SECRETS = {
    "bearer": ("Authorization: Bearer abcDEF123456789.xyz", "abcDEF123456789.xyz"),
    "openai": ("key sk-proj-AbCdEfGhIjKlMnOpQrSt123", "sk-proj-AbCdEfGhIjKlMnOpQrSt123"),
    "hf": ("token hf_AbCdEfGhIjKlMnOpQrStUvWx", "hf_AbCdEfGhIjKlMnOpQrStUvWx"),
    "aws": ("aws AKIAIOSFODNN7EXAMPLE here", "AKIAIOSFODNN7EXAMPLE"),
    "password": ("db password=hunter2secret", "hunter2secret"),
    "token_pair": ("url?token=abc123def456&x=1", "abc123def456"),
    "api_key": ("api_key: 'zzz-987-secret'", "zzz-987-secret"),
}


@pytest.mark.parametrize("name", sorted(SECRETS))
def test_redact_hides_each_secret_shape(name):
    text, secret = SECRETS[name]
    out = log.redact(text)
    assert secret not in out
    assert log.REDACTED in out


def test_redact_leaves_ordinary_text_alone():
    text = "step 10 loss=1.234 tokens/s=5000 model=tiny-llama"
    assert log.redact(text) == text


HF_TOKEN = "hf_" + "Ab3De5Gh7Jk9Mn1Pq2St4Vw6Yz8Bc0"  # 30 letters and digits after the prefix
EMBEDDED = {
    "hf_in_path": (f"runs/run_{HF_TOKEN}_x/adapter", HF_TOKEN, f"runs/run_{log.REDACTED}_x/adapter"),
    "aws_in_folder": ("out_AKIAIOSFODNN7EXAMPLE_x", "AKIAIOSFODNN7EXAMPLE", f"out_{log.REDACTED}_x"),
    "openai_after_underscore": (
        "key_sk-proj-AbCdEfGhIjKlMnOpQrSt",
        "sk-proj-AbCdEfGhIjKlMnOpQrSt",
        f"key_{log.REDACTED}",
    ),
    "bearer_with_spaces": ("Authorization: Bearer abc.def ghi", "ghi", f"Authorization: Bearer {log.REDACTED}"),
    "basic": ("Authorization: Basic dXNlcjpwYXNzd29yZA==", "dXNlcjpw", f"Authorization: Basic {log.REDACTED}"),
    "env_name_prefix": ("HF_TOKEN=abcdef123", "abcdef123", f"HF_TOKEN={log.REDACTED}"),
    "db_password": ("db_password=hunter2", "hunter2", f"db_password={log.REDACTED}"),
}


@pytest.mark.parametrize("name", sorted(EMBEDDED))
def test_redact_finds_secrets_inside_names_and_headers(name):
    text, secret, want = EMBEDDED[name]
    assert secret not in log.redact(text)
    assert log.redact(text) == want


@pytest.mark.parametrize(
    "text",
    [
        "shfoo",
        "sha256:" + "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
        "task-scheduler-with-a-long-name",
        "eos_token: <|im_end|> pad_token=<pad> max_tokens=128",
        "Basic usage: backprop train",
        "Bearer",
    ],
)
def test_redact_keeps_words_that_only_look_alike(text):
    assert log.redact(text) == text


def test_redacting_stream_covers_writelines():
    inner = io.StringIO()
    log.RedactingStream(inner).writelines([f"out {HF_TOKEN}\n", "Authorization: Basic abc\n"])
    assert inner.getvalue() == f"out {log.REDACTED}\nAuthorization: Basic {log.REDACTED}\n"


def test_redact_inside_json_keeps_it_valid():
    doc = json.dumps({"output": f"/runs/{HF_TOKEN}", "header": "Authorization: Bearer a b", "n": 1})
    parsed = json.loads(log.redact(doc))
    assert parsed == {"output": f"/runs/{log.REDACTED}", "header": f"Authorization: Bearer {log.REDACTED}", "n": 1}


@pytest.fixture
def echo_command():
    @cli.app.command("echo-for-test", hidden=True)
    def _echo(text: str) -> None:
        log.get_logger().warning("user said %s", text)

    yield
    cli.app.registered_commands = [c for c in cli.app.registered_commands if c.name != "echo-for-test"]


@pytest.mark.parametrize("name", sorted(SECRETS))
def test_cli_stderr_is_redacted_unless_verbose(echo_command, name):
    text, secret = SECRETS[name]
    quiet = run_cli("echo-for-test", text)
    assert secret not in quiet.stderr and log.REDACTED in quiet.stderr
    loud = run_cli("--verbose", "echo-for-test", text)
    assert secret in loud.stderr


def test_debug_env_disables_redaction(echo_command, monkeypatch):
    monkeypatch.setenv("BACKPROPAGATE_DEBUG", "1")
    text, secret = SECRETS["hf"]
    assert secret in run_cli("echo-for-test", text).stderr


def test_run_id_is_announced_and_bound_to_every_line():
    stream = io.StringIO()
    log.configure(stream=stream)
    rid = log.start_run()
    log.get_logger("train").info("step 1")
    log.get_logger().warning("something")
    lines = stream.getvalue().splitlines()
    assert lines[0].endswith(f"run_started run_id={rid}")
    assert uuid.UUID(rid)
    assert all(f"run_id={rid}" in line for line in lines)


def test_json_log_format_carries_run_id():
    stream = io.StringIO()
    log.configure(log_format="json", stream=stream)
    rid = log.start_run()
    log.get_logger().info("hello", extra={"fields": {"step": 3}})
    records = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert records[-1]["message"] == "hello" and records[-1]["step"] == 3
    assert all(r["run_id"] == rid for r in records)
    log.configure()
    logging.getLogger(log.LOGGER_NAME).handlers.clear()


def test_cli_never_shows_a_token_in_the_output_folder_name(tmp_path):
    """A real one-step run whose --output holds a token: neither stream shows it, and --json stays JSON."""
    out = tmp_path / f"run_{HF_TOKEN}_x"
    r = run_cli("train", "--model", "tiny-llama", "--steps", "1", "--output", str(out), "--json")
    assert r.status == 0, r.stderr
    assert HF_TOKEN not in r.stdout and HF_TOKEN not in r.stderr
    summary = json.loads(r.stdout)
    assert f"run_{log.REDACTED}_x" in json.dumps(summary)
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    loud_out = tmp_path / f"loud_{HF_TOKEN}"
    loud = run_cli("--verbose", "train", "--model", "tiny-llama", "--steps", "1", "--output", str(loud_out), "--json")
    assert HF_TOKEN in loud.stdout
