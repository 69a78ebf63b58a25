"""Run history: records written by real train/export runs, concurrency, liveness, damage, migrations, CLI."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from backpropagate.errors import BackpropagateError, RunFailedError, StateError
from backpropagate.runs import record, store
from backpropagate.runs.store import RunStore, default_path
from cli_helpers import run_cli

DATA_ROWS = [
    {"messages": [{"role": "user", "content": f"What is {a} plus {a}?"}, {"role": "assistant", "content": f"{2 * a}."}]}
    for a in range(12)
]
FAST = dict(max_seq_length=128, micro_batch=1, grad_accumulation=2, progress=False, report_to="none")


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("runs-data") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in DATA_ROWS))
    return path


@pytest.fixture(scope="module")
def trained(tiny_llama: Path, data_file: Path, tmp_path_factory: pytest.TempPathFactory):
    from backpropagate import Trainer

    trainer = Trainer("tiny-llama", output_dir=str(tmp_path_factory.mktemp("runs") / "first"), **FAST)
    result = trainer.train(data_file, steps=1)
    return trainer, result


def test_train_writes_a_completed_record(trained, data_file):
    _, result = trained
    rec = RunStore().get(result.run_id)
    assert rec is not None
    assert (rec.command, rec.status, rec.model) == ("train", "completed", "tiny-llama")
    assert rec.data == str(data_file)
    assert rec.data_hash and len(rec.data_hash) == 32
    assert rec.config["learning_rate"] > 0 and rec.config["data_config"]["max_seq_length"] == 128
    assert rec.metrics["final_loss"] == pytest.approx(result.final_loss)
    assert rec.metrics["steps"] == 1
    assert rec.outputs["adapter_dir"] == str(result.adapter_dir)
    assert rec.metrics_path == str(result.metrics_path) and Path(rec.metrics_path).is_file()
    assert rec.pid == os.getpid() and rec.ended_at is not None and rec.ended_at >= rec.started_at


def test_export_is_recorded_with_the_trained_run_as_parent(trained):
    trainer, result = trained
    exported = trainer.export("lora")
    exports = [r for r in RunStore().records(command="export") if r.parent_run_id == result.run_id]
    assert len(exports) == 1
    assert exports[0].status == "completed"
    assert exports[0].outputs["path"] == str(exported.path)
    assert exports[0].config["fmt"] == "lora"


def test_bad_data_is_recorded_as_failed_with_its_code(tiny_llama, tmp_path):
    from backpropagate import Trainer

    before = {r.run_id for r in RunStore().records()}
    with pytest.raises(BackpropagateError) as err:
        Trainer("tiny-llama", output_dir=str(tmp_path / "out"), **FAST).train(tmp_path / "missing.jsonl", steps=1)
    new = [r for r in RunStore().records() if r.run_id not in before]
    assert len(new) == 1
    assert new[0].status == "failed" and new[0].error_code == err.value.code == "INPUT_FILE_NOT_FOUND"


@pytest.mark.parametrize(
    ("raised", "status", "code"),
    [
        (RunFailedError("RUNTIME_INTERRUPTED", "stopped by SIGINT"), "interrupted", "RUNTIME_INTERRUPTED"),
        (RunFailedError("RUNTIME_TERMINATED", "stopped by SIGTERM"), "interrupted", "RUNTIME_TERMINATED"),
        (KeyboardInterrupt(), "interrupted", "RUNTIME_INTERRUPTED"),
        (RunFailedError("RUNTIME_TRAINING_DIVERGED", "loss is nan"), "failed", "RUNTIME_TRAINING_DIVERGED"),
    ],
)
def test_recording_closes_with_the_status_of_how_the_run_ended(raised, status, code):
    run_id = f"end-{status}-{code}-{time.time_ns()}"
    with pytest.raises(type(raised)), record.RunRecording("train") as recording:
        recording.start(run_id, model="tiny-llama")
        raise raised
    rec = RunStore().get(run_id)
    assert rec is not None and (rec.status, rec.error_code) == (status, code)


def test_heartbeat_advances_while_the_run_works(monkeypatch):
    monkeypatch.setattr(record, "HEARTBEAT_S", 0.05)
    run_id = f"beat-{time.time_ns()}"
    with record.RunRecording("eval") as recording:
        recording.start(run_id)
        first = RunStore().get(run_id).heartbeat_at  # type: ignore[union-attr]
        time.sleep(0.4)
        later = RunStore().get(run_id).heartbeat_at  # type: ignore[union-attr]
        recording.complete({"loss": 1.0}, {})
    assert later > first
    assert RunStore().get(run_id).status == "completed"  # type: ignore[union-attr]


WRITER = textwrap.dedent(
    """
    import sys
    import time
    from backpropagate.runs.store import RunStore
    worker, start_at = sys.argv[1], float(sys.argv[2])
    time.sleep(max(0.0, start_at - time.time()))  # all open the new database at once
    for i in range(50):
        s = RunStore()
        s.start(f"w{worker}-{i}", "train", config={"i": i})
        s.heartbeat(f"w{worker}-{i}")
        s.finish(f"w{worker}-{i}", "completed", metrics={"final_loss": i / 10})
    """
)


def test_four_processes_writing_at_once_lose_nothing(tmp_path):
    env = {**os.environ, "BACKPROPAGATE_HOME": str(tmp_path)}
    start_at = str(time.time() + 3.0)
    procs = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(w), start_at], env=env, stderr=subprocess.PIPE, text=True)
        for w in range(4)
    ]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], errors
    assert not any("locked" in e for e in errors)
    records = RunStore(tmp_path / "runs.db").records()
    assert len(records) == 200
    assert {r.status for r in records} == {"completed"}
    assert sorted(r.metrics["final_loss"] for r in records if r.run_id.startswith("w2-")) == [i / 10 for i in range(50)]
    conn = sqlite3.connect(tmp_path / "runs.db")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


KILLED_TRAINING = textwrap.dedent(
    """
    import sys
    from backpropagate import Trainer
    Trainer("tiny-llama", output_dir=sys.argv[1], max_seq_length=128, micro_batch=1, grad_accumulation=1,
            progress=False, report_to="none").train(sys.argv[2], steps=100000)
    """
)


def test_a_run_killed_with_sigkill_reads_interrupted_afterwards(tiny_llama, data_file, tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_TRAINING, str(tmp_path / "killed"), str(data_file)],
        env=dict(os.environ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        running = []
        while not running and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.5)
            running = [r for r in RunStore().records(status="running") if r.pid == proc.pid]
        assert running, "the training process never recorded its run"
        time.sleep(1.0)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert RunStore().get(running[0].run_id).status == "running"  # type: ignore[union-attr]  # nobody closed it
    res = run_cli("runs", "list", "--json")
    assert res.status == 0, res.stderr
    listed = {r["run_id"]: r for r in json.loads(res.stdout)}
    assert listed[running[0].run_id]["status"] == "interrupted"


def test_a_stale_heartbeat_marks_a_run_interrupted_even_if_its_pid_lives(tmp_path):
    s = RunStore(tmp_path / "runs.db")
    s.start("stale", "train")
    s.update("stale", heartbeat_at=time.time() - store.STALE_AFTER_S - 1)  # this (live) process, silent too long
    s.start("fresh", "train")
    assert s.reap_dead() == ["stale"]
    assert s.get("stale").status == "interrupted"  # type: ignore[union-attr]
    assert s.get("fresh").status == "running"  # type: ignore[union-attr]
    s.heartbeat("stale")  # it was only slow: its next heartbeat makes it running again
    assert s.get("stale").status == "running"  # type: ignore[union-attr]


@pytest.fixture
def garbage_history():
    """The real history file replaced by garbage bytes for one test, then put back."""
    path = default_path()
    saved = path.with_suffix(".saved")
    if path.exists():
        path.rename(saved)
    for extra in (path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        extra.unlink(missing_ok=True)
    path.write_bytes(os.urandom(8192))
    yield path
    path.unlink()
    if saved.exists():
        saved.rename(path)


def test_a_garbage_history_is_a_coded_error_for_runs_commands(garbage_history):
    res = run_cli("runs", "list")
    assert res.status == 6
    assert res.stderr.startswith("[STATE_RUN_HISTORY_UNAVAILABLE]")
    assert str(garbage_history) in res.stderr


def test_a_garbage_history_never_stops_training(garbage_history, data_file, tmp_path, caplog):
    from backpropagate import Trainer

    with caplog.at_level("WARNING", logger="backpropagate"):
        result = Trainer("tiny-llama", output_dir=str(tmp_path / "out"), **FAST).train(data_file, steps=1)
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()
    assert any("STATE_RUN_HISTORY_UNAVAILABLE" in r.getMessage() for r in caplog.records)


def test_a_locked_history_is_a_warning_for_a_run_and_readers_still_read(tmp_path, monkeypatch, caplog):
    path = tmp_path / "runs.db"
    RunStore(path).start("before-the-lock", "train")
    monkeypatch.setattr(store, "BUSY_TIMEOUT_S", 0.2)
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # another process holding the write lock for longer than the timeout
    try:
        with caplog.at_level("WARNING", logger="backpropagate"), record.RunRecording("train", store_path=path) as rec:
            rec.start("during-the-lock", model="tiny-llama")
            rec.complete({"final_loss": 1.0}, {})
        assert any(
            "STATE_RUN_HISTORY_UNAVAILABLE" in r.getMessage() and "locked" in r.getMessage() for r in caplog.records
        )
        assert [r.run_id for r in RunStore(path).records()] == ["before-the-lock"]  # WAL readers are not blocked
    finally:
        holder.execute("ROLLBACK")
        holder.close()


def test_opening_a_v1_history_with_newer_code_migrates_it(tmp_path, monkeypatch):
    path = tmp_path / "runs.db"
    old = RunStore(path)
    assert old.schema_version() == 1
    old.start("kept", "train", config={"lora_r": 8})
    monkeypatch.setattr(store, "MIGRATIONS", [*store.MIGRATIONS, "ALTER TABLE runs ADD COLUMN note TEXT"])
    new = RunStore(path)
    assert new.schema_version() == 2
    assert new.get("kept").config == {"lora_r": 8}  # type: ignore[union-attr]
    columns = [row[1] for row in sqlite3.connect(path).execute("PRAGMA table_info(runs)")]
    assert "note" in columns


def test_a_history_from_a_newer_version_is_refused_with_a_code(tmp_path):
    path = tmp_path / "runs.db"
    RunStore(path)
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(StateError) as err:
        RunStore(path)
    assert err.value.code == "STATE_RUN_HISTORY_UNAVAILABLE" and "99" in err.value.message


def test_runs_list_show_and_json(trained):
    _, result = trained
    res = run_cli("runs", "list", "--command", "train")
    assert res.status == 0
    header, *rows = res.stdout.splitlines()
    assert header.split()[:3] == ["ID", "COMMAND", "STATUS"]
    assert any(row.startswith(result.run_id[:8]) and "completed" in row for row in rows)
    shown = run_cli("runs", "show", result.run_id[:10])
    assert shown.status == 0
    assert f"run          {result.run_id}" in shown.stdout
    assert "final_loss" in shown.stdout and str(result.adapter_dir) in shown.stdout
    as_json = json.loads(run_cli("runs", "show", result.run_id, "--json").stdout)
    assert as_json["run_id"] == result.run_id and as_json["metrics"]["steps"] == 1
    assert run_cli("runs", "list", "--status", "sleeping").status == 2


def test_runs_show_ambiguous_and_unknown_prefixes():
    s = RunStore()
    s.start("abcd-0001", "train")
    s.start("abcd-0002", "eval")
    res = run_cli("runs", "show", "abcd")
    assert res.status == 2
    assert res.stderr.startswith("[CONFIG_RUN_ID_AMBIGUOUS]")
    assert "abcd-0001" in res.stderr and "abcd-0002" in res.stderr
    res = run_cli("runs", "show", "no-such-run")
    assert res.status == 6 and res.stderr.startswith("[STATE_RUN_NOT_FOUND]")


def test_runs_diff_shows_only_differing_settings_and_the_metrics(trained):
    _, result = trained
    other = RunStore()
    rec = other.get(result.run_id)
    assert rec is not None
    other.start("diff-other", "train", model="tiny-llama", config={**rec.config, "learning_rate": 1e-5})
    other.finish("diff-other", "completed", metrics={**rec.metrics, "final_loss": 9.5})
    res = run_cli("runs", "diff", result.run_id, "diff-other")
    assert res.status == 0, res.stderr
    lines = {line.split()[0]: line.split()[1:] for line in res.stdout.splitlines()[1:] if line.strip()}
    assert lines["learning_rate"][1] == "1e-05"
    assert "lora_r" not in lines and "model" not in lines  # equal settings are left out
    assert lines["final_loss"][1] == "9.5"
    everything = json.loads(run_cli("runs", "diff", result.run_id, "diff-other", "--all", "--json").stdout)
    assert everything["settings"]["lora_r"] == [rec.config["lora_r"]] * 2


def test_runs_rm_keeps_files_unless_asked(trained, tmp_path):
    trainer, _ = trained
    exported = trainer.export("lora", output=tmp_path / "exported", force=True)
    export_run = RunStore().records(command="export")[0]
    assert export_run.outputs["path"] == str(exported.path)
    res = run_cli("runs", "rm", export_run.run_id)
    assert res.status == 0 and RunStore().get(export_run.run_id) is None
    assert exported.path.is_dir()
    trainer.export("lora", output=tmp_path / "exported", force=True)
    export_run = RunStore().records(command="export")[0]
    res = run_cli("runs", "rm", export_run.run_id[:12], "--files")
    assert res.status == 0 and f"removed {exported.path}" in res.stdout
    assert not exported.path.exists()


def test_resume_run_continues_a_recorded_run_in_its_folder(trained, data_file):
    from backpropagate import Trainer

    _, first = trained
    resumed = Trainer("tiny-llama", resume_run=first.run_id[:13], **FAST).train(data_file, steps=2)
    assert resumed.run_id == first.run_id and resumed.steps == 2
    assert resumed.output_dir == first.output_dir
    rec = RunStore().get(first.run_id)
    assert rec is not None and rec.status == "completed" and rec.metrics["steps"] == 2


def test_resume_run_of_an_unknown_id_is_a_coded_error(tiny_llama):
    res = run_cli("train", "--resume-run", "no-such-run", "--steps", "1")
    assert res.status == 6
    assert res.stderr.startswith("[STATE_RUN_NOT_FOUND]")


def test_resume_run_needs_a_training_run_whose_folder_still_exists(tiny_llama, tmp_path):
    from backpropagate import Trainer
    from backpropagate.errors import ConfigError

    s = RunStore()
    s.start("export-only-0001", "export")
    s.start("gone-folder-0001", "train", output_dir=str(tmp_path / "deleted"))
    with pytest.raises(ConfigError) as not_train:
        Trainer("tiny-llama", resume_run="export-only-0001")
    assert not_train.value.code == "CONFIG_INVALID_SETTING" and "export run" in not_train.value.message
    with pytest.raises(StateError) as gone:
        Trainer("tiny-llama", resume_run="gone-folder-0001")
    assert gone.value.code == "STATE_RUN_OUTPUT_MISSING"


def test_runs_rm_refuses_a_run_whose_process_is_alive():
    RunStore().start("alive-0001", "train")  # recorded by this very (live) process
    res = run_cli("runs", "rm", "alive-0001")
    assert res.status == 2 and "still running" in res.stderr
    assert RunStore().get("alive-0001") is not None
