import re
from pathlib import Path

import pytest
import typer

from backpropagate import cli
from backpropagate.errors import (
    CATALOG,
    FAMILY_EXIT,
    BackpropagateError,
    ConfigError,
    InputError,
    from_code,
)
from cli_helpers import run_cli

REPO = Path(__file__).resolve().parents[1]
CODE_RE = re.compile(r'"((?:CONFIG|INPUT|DEP|RUNTIME|STATE)_[A-Z0-9_]+)"')


def test_codes_are_unique_and_well_formed():
    for code, entry in CATALOG.items():
        assert re.fullmatch(r"(CONFIG|INPUT|DEP|RUNTIME|STATE)_[A-Z0-9_]+", code)
        assert entry.hint and "\n" not in entry.hint


def test_family_mismatch_is_refused():
    with pytest.raises(ValueError):
        ConfigError("INPUT_FILE_NOT_FOUND", "x")
    with pytest.raises(ValueError):
        BackpropagateError("NOT_A_CODE", "x")


def test_from_code_picks_the_family_class():
    err = from_code("INPUT_DATASET_PARSE_FAILED", "data.jsonl:3: bad json")
    assert isinstance(err, InputError) and isinstance(err, ValueError)
    assert str(err) == "[INPUT_DATASET_PARSE_FAILED]: data.jsonl:3: bad json"


@pytest.fixture
def raising_command():
    """Adds a command that raises a given code, removed again after the test."""
    holder: dict[str, str] = {}

    @cli.app.command("raise-for-test", hidden=True)
    def _raise() -> None:
        raise from_code(holder["code"], f"something about {holder['code'].lower()}")

    yield holder
    cli.app.registered_commands = [c for c in cli.app.registered_commands if c.name != "raise-for-test"]


@pytest.mark.parametrize("code", sorted(CATALOG))
def test_every_code_prints_code_message_hint_and_exit_status(raising_command, code):
    raising_command["code"] = code
    res = run_cli("raise-for-test")
    special = {"RUNTIME_INTERRUPTED": 130, "RUNTIME_TERMINATED": 143}
    expected = special.get(code, FAMILY_EXIT[code.split("_", 1)[0]])
    assert res.status == expected
    first, second = res.stderr.splitlines()[:2]
    assert first == f"[{code}]: something about {code.lower()}"
    assert second.startswith("hint: " + CATALOG[code].hint)
    assert second.endswith("(retryable)") == CATALOG[code].retryable


def test_usage_error_exits_2():
    res = run_cli("info", "--no-such-flag")
    assert res.status == 2


def test_keyboard_interrupt_exits_130(monkeypatch):
    @cli.app.command("interrupt-for-test", hidden=True)
    def _interrupt() -> None:
        raise KeyboardInterrupt

    try:
        res = run_cli("interrupt-for-test")
    finally:
        cli.app.registered_commands = [c for c in cli.app.registered_commands if c.name != "interrupt-for-test"]
    assert res.status == 130
    assert res.stderr.startswith("[RUNTIME_INTERRUPTED]")


def test_error_codes_catalog_command_lists_every_code():
    res = run_cli("info", "--error-codes")
    assert res.status == 0
    listed = {line.split()[0] for line in res.stdout.splitlines() if line.strip()}
    assert listed == set(CATALOG)


def _codes_in(paths):
    found = {}
    for path in paths:
        for code in CODE_RE.findall(path.read_text(encoding="utf-8")):
            found.setdefault(code, path)
    return found


def test_catalog_docs_and_raise_sites_agree():
    docs = set(re.findall(r"^\| `([A-Z0-9_]+)` \|", (REPO / "docs" / "errors.md").read_text(), re.M))
    assert docs == set(CATALOG), "docs/errors.md and errors.CATALOG differ"
    sources = [p for p in (REPO / "python").rglob("*.py") if p.name != "errors.py"]
    sources += list((REPO / "rust").rglob("*.rs"))
    used = _codes_in(sources)
    unknown = {c: str(p) for c, p in used.items() if c not in CATALOG}
    assert not unknown, f"codes raised but not in the catalog: {unknown}"
    unused = set(CATALOG) - set(used) - {"RUNTIME_INTERRUPTED"}
    assert not unused, f"catalog codes that nothing raises: {sorted(unused)}"


def test_typer_is_the_cli_framework():
    assert isinstance(cli.app, typer.Typer)
