"""Data files a new user gets wrong: each is refused with a code, never a traceback."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from cli_helpers import run_cli

NOBODY = 65534
ROW = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'

# Runs `backprop` twice in one process: first as the current user with a missing data file,
# which imports every module that command path needs (the interpreter's own folder may be
# closed to other users), then, after dropping to an unprivileged uid when running as root
# (root reads files of mode 000), with the real arguments.
CHILD = """
import contextlib, io, json, os, sys
from backpropagate.cli import main

def run(args):
    try:
        main(args)
    except SystemExit as done:
        return done.code or 0
    return 0

warm_up, args, uid = json.loads(sys.argv[1])
with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
    run(warm_up)
if uid is not None:
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
sys.exit(run(args))
"""


@pytest.fixture
def open_dir():
    """A folder every user may enter and write to (pytest's own tmp_path is private to its user)."""
    path = Path(tempfile.mkdtemp(prefix="bp-bad-files-"))
    path.chmod(0o777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def run_denied(warm_up: list[str], args: list[str], home: Path) -> subprocess.CompletedProcess[str]:
    """`backprop ARGS` in a child process that may not read mode-000 files (see CHILD)."""
    uid = NOBODY if os.geteuid() == 0 else None
    env = {**os.environ, "BACKPROPAGATE_HOME": str(home)}
    payload = json.dumps([warm_up, args, uid])
    return subprocess.run(
        [sys.executable, "-c", CHILD, payload], capture_output=True, text=True, env=env, timeout=600, check=False
    )


def unreadable_file(folder: Path, name: str = "secret.jsonl") -> Path:
    """A dataset file of mode 000 (skips where this user can still read it and is not root)."""
    path = folder / name
    path.write_text(ROW)
    path.chmod(0)
    if os.geteuid() != 0 and os.access(path, os.R_OK):
        pytest.skip("chmod 000 does not deny reads here")
    return path


def assert_unreadable(status: int, stderr: str, path: Path, words: str) -> None:
    assert "Traceback" not in stderr, stderr
    assert status == 3, stderr
    first, hint = stderr.strip().splitlines()[-2:]
    assert first.startswith(f"[INPUT_FILE_UNREADABLE]: {path}: "), stderr
    assert words in first and hint.startswith("hint: "), stderr


@pytest.mark.parametrize("name", ["secret.jsonl", "secret.parquet"])
def test_validate_refuses_an_unreadable_file(open_dir, name):
    path = unreadable_file(open_dir, name)
    res = run_denied(["validate", str(open_dir / "missing.jsonl")], ["validate", str(path)], open_dir)
    assert_unreadable(res.returncode, res.stderr, path, "permission denied")
    res = run_denied(["validate", str(open_dir / "missing.jsonl")], ["validate", str(path), "--json"], open_dir)
    assert res.returncode == 3
    assert json.loads(res.stdout)["error"]["code"] == "INPUT_FILE_UNREADABLE"


def test_validate_refuses_a_file_in_a_closed_folder(open_dir):
    closed = open_dir / "closed"
    closed.mkdir()
    (closed / "data.jsonl").write_text(ROW)
    closed.chmod(0)
    if os.geteuid() != 0 and os.access(closed, os.X_OK):
        pytest.skip("chmod 000 does not close folders here")
    path = closed / "data.jsonl"
    res = run_denied(["validate", str(open_dir / "missing.jsonl")], ["validate", str(path)], open_dir)
    assert_unreadable(res.returncode, res.stderr, path, "permission denied")


def test_train_refuses_an_unreadable_file(open_dir, tiny_llama):
    model = open_dir / "model"
    shutil.copytree(tiny_llama, model)
    for p in [model, *model.rglob("*")]:
        p.chmod(p.stat().st_mode | stat.S_IROTH | (stat.S_IXOTH if p.is_dir() else 0))
    closed = open_dir / "closed"
    closed.mkdir(mode=0)
    train = ["train", "--model", str(model), "--steps", "1", "--no-progress"]
    for path in (unreadable_file(open_dir), closed / "data.jsonl"):
        res = run_denied(
            [*train, "--data", str(open_dir / "missing.jsonl"), "-o", str(open_dir / "warm-up")],
            [*train, "--data", str(path), "-o", str(open_dir / "run")],
            open_dir,
        )
        assert_unreadable(res.returncode, res.stderr, path, "permission denied")


def test_a_parquet_file_that_is_not_parquet(tmp_path):
    data = tmp_path / "data.parquet"
    data.write_text(ROW)
    res = run_cli("validate", str(data))
    assert res.status == 3 and "Traceback" not in res.stderr
    assert res.stderr.startswith(f"[INPUT_DATASET_PARSE_FAILED]: {data}: not a readable Parquet file: ")


def test_a_directory_as_the_data_file(tmp_path, tiny_llama):
    folder = tmp_path / "data.jsonl"
    folder.mkdir()
    res = run_cli("validate", str(folder))
    assert_unreadable(res.status, res.stderr, folder, "is a directory")
    res = run_cli("validate", str(folder), "--model", str(tiny_llama))
    assert_unreadable(res.status, res.stderr, folder, "is a directory")
    res = run_cli("train", "--model", str(tiny_llama), "--data", str(folder), "-o", str(tmp_path / "run"))
    assert_unreadable(res.status, res.stderr, folder, "is a directory")


def test_log_format_json_prints_coded_errors_as_one_json_object(tmp_path):
    missing = tmp_path / "missing.jsonl"
    res = run_cli("--log-format", "json", "validate", str(missing))
    assert res.status == 3
    lines = [json.loads(line) for line in res.stderr.splitlines()]
    assert lines[-1] == {
        "level": "error",
        "code": "INPUT_FILE_NOT_FOUND",
        "message": f"{missing}: no such dataset file",
        "hint": "Check the path; relative paths start from the current folder.",
        "retryable": False,
        "exit_status": 3,
    }
    # The text form is back on the next plain invocation.
    assert run_cli("validate", str(missing)).stderr.startswith("[INPUT_FILE_NOT_FOUND]: ")


def test_validate_json_prints_json_whatever_fails(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text(ROW)
    res = run_cli("validate", str(data), "--json", "--max-seq-length", "1")
    assert res.status == 2
    out = json.loads(res.stdout)
    assert out["ok"] is False and out["file"] == str(data)
    assert out["error"]["code"] == "CONFIG_INVALID_SETTING" and out["error"]["exit_status"] == 2
    res = run_cli("validate", str(tmp_path), "--json")
    assert res.status == 3 and json.loads(res.stdout)["error"]["code"] == "INPUT_FILE_UNREADABLE"
    # Options the command cannot even parse.
    for args in (["--max-seq-length", "abc"], ["--no-such-flag"]):
        res = run_cli("validate", str(data), "--json", *args)
        assert res.status == 2 and json.loads(res.stdout)["error"]["code"] == "CONFIG_INVALID_SETTING"
    res = run_cli("validate", "--json")
    assert res.status == 2 and "Missing argument 'file'" in json.loads(res.stdout)["error"]["message"]


def test_train_json_prints_errors_as_json(tmp_path):
    res = run_cli("train", "--data", str(tmp_path / "missing.jsonl"), "-o", str(tmp_path / "run"), "--json")
    assert res.status == 3
    error = json.loads(res.stdout)["error"]
    assert error["code"] == "INPUT_FILE_NOT_FOUND" and error["hint"] and error["retryable"] is False
    res = run_cli("train", "--schedule", "zigzag", "-o", str(tmp_path / "run"), "--json")
    assert res.status == 2 and json.loads(res.stdout)["error"]["code"] == "CONFIG_INVALID_SETTING"


TWO_ROWS = '{"text": "first row"}\n{"text": "second row"}\n'


@pytest.mark.parametrize(
    ("raw", "encoding"),
    [
        (b"\xff\xfe" + TWO_ROWS.encode("utf-16-le"), "UTF-16 LE"),
        (b"\xfe\xff" + TWO_ROWS.encode("utf-16-be"), "UTF-16 BE"),
        (b"\xff\xfe\x00\x00" + TWO_ROWS.encode("utf-32-le"), "UTF-32 LE"),
        (b"\x00\x00\xfe\xff" + TWO_ROWS.encode("utf-32-be"), "UTF-32 BE"),
        (TWO_ROWS.encode("utf-16-le"), "UTF-16 or UTF-32"),
    ],
    ids=["utf-16-le", "utf-16-be", "utf-32-le", "utf-32-be", "utf-16-no-mark"],
)
def test_utf16_and_utf32_files_are_refused_whole(tmp_path, tiny_llama, raw, encoding):
    data = tmp_path / "data.jsonl"
    data.write_bytes(raw)
    code = "INPUT_DATASET_ENCODING_UNSUPPORTED"
    res = run_cli("validate", str(data))
    assert res.status == 3 and "Traceback" not in res.stderr
    first, hint = res.stderr.splitlines()[:2]
    evidence = (
        "the line holds NUL bytes, as UTF-16 or UTF-32 text without a byte-order mark does"
        if encoding == "UTF-16 or UTF-32"
        else f"the line starts with a {encoding} byte-order mark"
    )
    assert first == (
        f"[{code}]: {data}: the file is {encoding}, not UTF-8 (line 1, its first bad line: {evidence}); "
        "only UTF-8 is read"
    )
    assert "iconv -f UTF-16 -t UTF-8 in.jsonl > out.jsonl" in hint
    # Skipping bad rows does not apply: no row of such a file could be read.
    res = run_cli("train", "--model", str(tiny_llama), "--data", str(data), "--skip-invalid", "-o", str(tmp_path / "r"))
    assert res.status == 3 and f"[{code}]: {data}: the file is {encoding}" in res.stderr


def test_a_utf16_file_appended_to_a_utf8_one_is_refused_at_its_line(tmp_path):
    data = tmp_path / "joined.jsonl"
    data.write_bytes(b'{"text": "utf-8 row"}\n' + TWO_ROWS.encode("utf-16"))
    out = json.loads(run_cli("validate", str(data), "--json").stdout)
    assert out["error"]["code"] == "INPUT_DATASET_ENCODING_UNSUPPORTED"
    assert "(line 2, its first bad line: the line starts with a UTF-16 LE byte-order mark)" in out["error"]["message"]


def test_latin1_lines_are_reported_one_by_one(tmp_path):
    data = tmp_path / "latin1.jsonl"
    data.write_bytes('{"text": "fine"}\n{"text": "café"}\n{"text": "ok"}\n'.encode("latin-1"))
    res = run_cli("validate", str(data))
    assert res.status == 3
    assert res.stderr.startswith(f"[INPUT_DATASET_PARSE_FAILED]: {data}: 1 bad row of 3 read")
    assert f"{data}:2: invalid UTF-8 at byte 14 of the line (byte 0xE9); the file may be Latin-1" in res.stdout
    report = json.loads(run_cli("validate", str(data), "--json", "--skip-invalid").stdout)
    assert report["ok"] and report["error"] is None
    assert report["dropped"] == {"encoding": 1} and report["dropped_lines"] == {"encoding": [2]}


@pytest.mark.parametrize("content", ["", "\n  \n\r\n"], ids=["empty", "blank-lines"])
def test_validate_refuses_an_empty_file_like_train(tmp_path, tiny_llama, content):
    data = tmp_path / "empty.jsonl"
    data.write_text(content)
    message = f"{data}: the file has no rows (it is empty or holds only blank lines)"
    train = run_cli("train", "--model", str(tiny_llama), "--data", str(data), "-o", str(tmp_path / "r"))
    assert train.status == 3 and train.stderr.splitlines()[-2] == f"[INPUT_DATASET_EMPTY]: {message}"
    for extra in ([], ["--model", str(tiny_llama)]):
        res = run_cli("validate", str(data), *extra)
        assert res.status == 3
        first, hint = res.stderr.splitlines()[:2]
        assert first == f"[INPUT_DATASET_EMPTY]: {message}"
        assert hint.startswith("hint: The file is empty (or only blank lines)")
        assert res.stdout.splitlines()[-1] == "not usable as is: INPUT_DATASET_EMPTY (below)"
        out = json.loads(run_cli("validate", str(data), "--json", *extra).stdout)
        assert not out["ok"] and out["error"]["code"] == "INPUT_DATASET_EMPTY"
        assert out["error"]["message"] == message and out["error"]["exit_status"] == 3
