"""Random combinations of bad settings, bad files and occupied outputs through the real CLI.

Whatever goes wrong, the user sees `[CODE]: message` with a code from the catalog, the
process exits with that code's family status, no Python stack trace is printed, and
nothing that was already under the output folder is changed or lost.
"""

import hashlib
import json
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backpropagate.errors import CATALOG, EXIT_INTERRUPTED, FAMILY_EXIT
from backpropagate.examples import __file__ as examples_init
from cli_helpers import run_cli

EXAMPLES = Path(examples_init).parent
CODED = re.compile(r"^\[([A-Z0-9_]+)\]: \S")

BAD_SETTINGS = {
    "--lora-r": ["0", "-4", "2.5", "many"],
    "--lora-alpha": ["0", "-1", "nan"],
    "--lora-dropout": ["-0.1", "1", "7"],
    "--learning-rate": ["0", "-1e-4", "3", "inf"],
    "--max-seq-length": ["0", "1", "-512", "1e9"],
    "--warmup-ratio": ["2", "-0.5"],
    "--weight-decay": ["-0.01"],
    "--micro-batch": ["0", "-2"],
    "--grad-accumulation": ["0"],
    "--eval-split": ["0.9", "-0.1"],
    "--seed": ["-1"],
    "--save-every": ["-3"],
    "--trace-min-tokens": ["-1"],
    "--mode": ["quantum"],
    "--method": ["dpo"],
    "--schedule": ["exponential"],
    "--steps": ["0", "-5"],
    "--epochs": ["0", "-1"],
}

BAD_FILES = {
    "missing": None,
    "empty": b"",
    "blank lines": b"\n\n  \n",
    "utf16": '{"text": "hello"}\n'.encode("utf-16"),
    "not json": b'{"text": "ok"}\n{not json at all\n',
    "not an object": b'[1, 2, 3]\n"just a string"\n',
    "unknown shape": b'{"question": "q?", "reply": "a"}\n',
    "wrong field type": b'{"messages": "hello"}\n',
    "binary": bytes(range(256)) * 4,
    "mixed kinds": b'{"text": "a"}\n{"prompt": "p", "chosen": "c", "rejected": "r"}\n',
    "directory": "dir",
}


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` with a hash of its bytes."""
    if not folder.exists():
        return {}
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def write_bad_file(folder: Path, kind: str) -> Path:
    path = folder / f"data-{kind.replace(' ', '_')}.jsonl"
    content = BAD_FILES[kind]
    if content == "dir":
        path.mkdir(exist_ok=True)
    elif content is not None:
        path.write_bytes(content)
    return path


def assert_coded_failure(res, output: Path, before: dict[str, str]) -> str:
    assert res.status != 0, res.stdout
    assert "Traceback" not in res.stderr and "Traceback" not in res.stdout, res.stderr
    coded = [m for m in map(CODED.match, res.stderr.splitlines()) if m]  # log lines may come first
    assert len(coded) == 1, f"not one coded error on stderr: {res.stderr!r}"
    match = coded[0]
    code = match.group(1)
    assert code in CATALOG, code
    expected = EXIT_INTERRUPTED if code == "RUNTIME_INTERRUPTED" else FAMILY_EXIT[code.split("_", 1)[0]]
    assert res.status == expected, (code, res.status)
    after = snapshot(output)
    assert {k: v for k, v in after.items() if k in before} == before, "files under the output folder changed"
    return code


@pytest.fixture(scope="module")
def finished_run(tiny_llama, tmp_path_factory):
    """An output folder holding a finished run: what a careless command must not destroy."""
    out = tmp_path_factory.mktemp("fuzz") / "finished"
    res = run_cli(
        "train", "--model", "tiny-llama", "--steps", "1", "--output", str(out), "--no-progress", "--report-to", "none"
    )
    assert res.status == 0, res.stderr
    return out


OUTPUT_STATES = ("fresh", "finished run", "is a file")


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    settings_=st.dictionaries(st.sampled_from(sorted(BAD_SETTINGS)), st.just(None), max_size=3),
    picks=st.randoms(use_true_random=False),
    bad_file=st.sampled_from(sorted(BAD_FILES) + ["good"]),
    output_state=st.sampled_from(OUTPUT_STATES),
)
def test_train_fails_with_a_coded_error_and_keeps_the_output(
    tiny_llama, finished_run, tmp_path_factory, settings_, picks, bad_file, output_state
):
    work = tmp_path_factory.mktemp("case")
    flags = [x for flag in settings_ for x in (flag, picks.choice(BAD_SETTINGS[flag]))]
    if not flags and bad_file == "good" and output_state == "fresh":
        flags = ["--lora-r", "0"]  # every case holds at least one mistake
    data = EXAMPLES / "chat.jsonl" if bad_file == "good" else write_bad_file(work, bad_file)
    output = {"fresh": work / "out", "finished run": finished_run, "is a file": work / "taken"}[output_state]
    if output_state == "is a file":
        output.write_text("keep me\n")
    before = snapshot(output) if output.is_dir() else {}
    before_file = output.read_bytes() if output.is_file() else None
    args = ["train", "--model", "tiny-llama", "--data", str(data), "--output", str(output)]
    args += ["--no-progress", "--report-to", "none"]
    if "--steps" not in settings_ and "--epochs" not in settings_:
        args += ["--steps", "1"]
    res = run_cli(*args, *flags)
    assert_coded_failure(res, output if output.is_dir() else work / "nothing", before)
    if before_file is not None:
        assert output.read_bytes() == before_file


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(bad_file=st.sampled_from(sorted(BAD_FILES)), as_json=st.booleans(), with_model=st.booleans())
def test_validate_fails_with_the_code_train_gives(tiny_llama, tmp_path_factory, bad_file, as_json, with_model):
    work = tmp_path_factory.mktemp("validate")
    data = write_bad_file(work, bad_file)
    args = ["validate", str(data), *(["--model", "tiny-llama"] if with_model else []), *(["--json"] if as_json else [])]
    res = run_cli(*args)
    assert res.status != 0
    assert "Traceback" not in res.stderr + res.stdout
    if as_json:
        report = json.loads(res.stdout)  # JSON whatever failed
        assert report["ok"] is False
        if "error" in report:
            assert report["error"]["code"] in CATALOG
            assert res.status == FAMILY_EXIT[report["error"]["code"].split("_", 1)[0]]
    else:
        coded = [m for m in map(CODED.match, res.stderr.splitlines()) if m]
        if coded:
            code = coded[0].group(1)
            assert res.status == FAMILY_EXIT[code.split("_", 1)[0]]
        else:  # a readable report of bad rows, exit 3
            assert res.status == 3 and "errors (" in res.stdout


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    source=st.sampled_from(["missing", "empty dir", "a file", "not an adapter", "finished"]),
    fmt=st.sampled_from(["gguf", "merged", "lora", "onnx"]),
    quant=st.sampled_from([None, "q4_k_m", "q9_z", "f16"]),
)
def test_export_fails_with_a_coded_error_and_keeps_its_source(
    tiny_llama, finished_run, tmp_path_factory, source, fmt, quant
):
    work = tmp_path_factory.mktemp("export")
    path = {
        "missing": work / "nope",
        "empty dir": work / "empty",
        "a file": work / "file.txt",
        "not an adapter": work / "other",
        "finished": finished_run / "adapter",
    }[source]
    if source == "empty dir":
        path.mkdir()
    elif source == "a file":
        path.write_text("hello")
    elif source == "not an adapter":
        path.mkdir()
        (path / "adapter_config.json").write_text("{broken")
    if source == "finished" and fmt != "onnx" and quant != "q9_z":
        return  # a valid export: not this test's business
    before = snapshot(finished_run)
    output = work / "exported"
    res = run_cli("export", str(path), "--format", fmt, *(["-q", quant] if quant else []), "--output", str(output))
    assert_coded_failure(res, finished_run, before)
    assert not output.exists()
