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
