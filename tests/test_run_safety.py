"""A run never loses what a user has: output folders, damaged checkpoints, signals, metrics, small data."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from backpropagate import Trainer
from backpropagate.errors import StateError
from backpropagate.examples import __file__ as examples_init
from backpropagate.train import checkpoint
from backpropagate.train.interrupt import StopRequest
from backpropagate.train.metrics import MetricsLogger
from backpropagate.train.torch import loop as torch_loop
from cli_helpers import run_cli

EXAMPLES = Path(examples_init).parent
BACKPROP = str(Path(sys.executable).parent / "backprop")
FAST = {"progress": False, "report_to": "none", "gradient_checkpointing": "off"}


@pytest.fixture(scope="module")
def dataset(tiny_llama):
    from backpropagate.data import DataConfig, prepare

    return prepare(EXAMPLES / "chat.jsonl", "tiny-llama", DataConfig(max_seq_length=512, cache=False))


def test_output_that_is_a_file_is_refused_before_any_work(tiny_llama, tmp_path):
    target = tmp_path / "taken"
    target.write_text("my notes\n")
    res = run_cli("train", "--model", "tiny-llama", "--steps", "1", "--output", str(target))
    assert res.status == 2, res.stderr
    assert res.stderr.startswith("[CONFIG_OUTPUT_DIR_INVALID]: output_dir=")
    assert "is a file" in res.stderr and "Traceback" not in res.stderr
    assert target.read_text() == "my notes\n"


@pytest.fixture
def immutable_dir(tmp_path):
    """A folder nobody may create files in, root included (ext4's immutable flag): a real write refusal."""
    folder = tmp_path / "locked"
    folder.mkdir()
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
        pytest.skip("this filesystem has no immutable flag")
    yield folder
    subprocess.run(["chattr", "-i", str(folder)], check=True)


def test_output_without_write_permission_is_a_coded_error(tiny_llama, immutable_dir):
    res = run_cli("train", "--model", "tiny-llama", "--steps", "1", "--output", str(immutable_dir / "run"))
    assert res.status == 2, res.stderr
    assert res.stderr.startswith("[CONFIG_OUTPUT_DIR_INVALID]: output_dir=")
    assert "cannot be written (Operation not permitted)" in res.stderr and "Traceback" not in res.stderr
    assert not (immutable_dir / "run").exists()


def test_a_finished_run_is_not_overwritten_without_overwrite(tiny_llama, dataset, tmp_path):
    out = tmp_path / "done"
    first = Trainer("tiny-llama", output_dir=str(out), **FAST).train(dataset, steps=2)
    adapter_bytes = (first.adapter_dir / "adapter_model.safetensors").read_bytes()
    import shutil

    shutil.rmtree(out / "checkpoints")  # only the finished adapter is left
    with pytest.raises(StateError) as err:
        Trainer("tiny-llama", output_dir=str(out), **FAST).train(dataset, steps=2)
    assert err.value.code == "STATE_OUTPUT_EXISTS" and "--overwrite" in err.value.hint
    assert (first.adapter_dir / "adapter_model.safetensors").read_bytes() == adapter_bytes
    again = Trainer("tiny-llama", output_dir=str(out), overwrite=True, seed=7, **FAST).train(dataset, steps=3)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    assert again.steps == 3


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_resume_skips_a_damaged_checkpoint_and_names_its_file(tiny_llama, dataset, tmp_path, caplog):
    # A constant rate, so a 4-step run resumed to 6 steps follows the 6-step run exactly.
    options = dict(FAST, save_every=2, keep_checkpoints=3, schedule="constant", warmup_ratio=0.0)
    full = Trainer("tiny-llama", output_dir=str(tmp_path / "full"), **options).train(dataset, steps=6)
    out = tmp_path / "cut"
    Trainer("tiny-llama", output_dir=str(out), **options).train(dataset, steps=4)
    _truncate(out / "checkpoints/step-000004" / checkpoint.WEIGHTS)
    resumed = Trainer("tiny-llama", output_dir=str(out), resume=True, **options).train(dataset, steps=6)
    assert "step-000004" in caplog.text and "trainable.safetensors" in caplog.text
    np.testing.assert_allclose([v for _, v in resumed.losses], [v for _, v in full.losses], rtol=1e-5, atol=1e-6)
    # The damaged checkpoint was replaced by the resumed run's own step 4.
    assert checkpoint.load(out / "checkpoints/step-000004").state.step == 4


def test_resume_with_every_checkpoint_damaged_is_a_coded_error(tiny_llama, tmp_path):
    out = tmp_path / "bad"
    data = str(EXAMPLES / "chat.jsonl")
    base = ["train", "--model", "tiny-llama", "--data", data, "--output", str(out), "--no-progress"]
    assert run_cli(*base, "--steps", "2", "--save-every", "1", "--report-to", "none").status == 0
    for step_dir in checkpoint.checkpoints(out / "checkpoints"):
        _truncate(step_dir / checkpoint.TRAINING)
    res = run_cli(*base, "--steps", "4", "--resume", "--report-to", "none")
    assert res.status == 6, res.stderr
    assert "[STATE_CHECKPOINT_INVALID]" in res.stderr and "training_state.pt" in res.stderr
    assert "Traceback" not in res.stderr


def test_metrics_hold_one_line_per_step_after_a_resume(tiny_llama, dataset, tmp_path, monkeypatch):
    out = tmp_path / "m"
    options = dict(FAST, save_every=4)
    real_log = MetricsLogger.log

    def die_after_logging_step_six(self, step, values):
        real_log(self, step, values)
        if step == 6:
            raise KeyboardInterrupt  # killed after steps 5 and 6 were logged, before their checkpoint at 8

    monkeypatch.setattr(MetricsLogger, "log", die_after_logging_step_six)
    with pytest.raises(KeyboardInterrupt):
        Trainer("tiny-llama", output_dir=str(out), **options).train(dataset, steps=8)
    logged = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, 7))
    monkeypatch.setattr(MetricsLogger, "log", real_log)
    result = Trainer("tiny-llama", output_dir=str(out), resume=True, **options).train(dataset, steps=8)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))
    run = json.loads(result.run_file.read_text())
    assert "--resume" not in run["command"] and "--output-dir" in run["command"]


def test_small_data_never_repeats_a_row_within_a_step(tiny_llama, tmp_path, caplog):
    from backpropagate.data import DataConfig, prepare

    small = prepare(EXAMPLES / "chat.jsonl", "tiny-llama", DataConfig(max_seq_length=4096, cache=False))
    assert small.num_rows < 8
    taken: list[np.ndarray] = []
    real_take = torch_loop.RowStream.take

    def record(self, start, count):
        rows = real_take(self, start, count)
        taken.append(rows)
        return rows

    torch_loop.RowStream.take = record
    try:
        result = Trainer(
            "tiny-llama", output_dir=str(tmp_path / "s"), micro_batch=2, grad_accumulation=4, **FAST
        ).train(small, steps=3)
    finally:
        torch_loop.RowStream.take = real_take
    assert f"only {small.num_rows} packed training row(s)" in caplog.text and "= 8 rows per step" in caplog.text
    assert all(len(np.unique(rows)) == len(rows) == small.num_rows for rows in taken)
    assert json.loads(result.run_file.read_text())["hyperparameters"]["rows_per_step"] == small.num_rows


def test_a_second_signal_ends_at_once():
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN where the suite runs in the background
    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested and stop.signal_name == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before


def _train_until_logged(out: Path, home: Path, steps_logged: int) -> subprocess.Popen[str]:
    cmd = [BACKPROP, "train", "--model", "tiny-llama", "--steps", "400"]
    cmd += ["--output", str(out), "--no-progress", "--report-to", "none", "--save-every", "0"]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "BACKPROPAGATE_HOME": str(home)},
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        metrics = out / "metrics.jsonl"
        if metrics.exists() and len(metrics.read_text().splitlines()) >= steps_logged:
            return proc
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("training did not start in time")


@pytest.mark.parametrize(
    ("sig", "status", "code"),
    [(signal.SIGINT, 130, "RUNTIME_INTERRUPTED"), (signal.SIGTERM, 143, "RUNTIME_TERMINATED")],
)
def test_a_signal_stops_at_a_step_boundary_with_a_checkpoint_and_the_resume_command(
    tiny_llama, tmp_path, _isolated_home, sig, status, code
):
    out = tmp_path / "run"
    proc = _train_until_logged(out, _isolated_home, 2)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == status, stderr
    assert f"[{code}]: stopped by {signal.Signals(sig).name} after step" in stderr
    assert "Traceback" not in stderr
    saved = checkpoint.checkpoints(out / "checkpoints")
    assert len(saved) == 1 and not (out / "adapter").exists()
    step = checkpoint.read_state(saved[0]).step
    assert 2 <= step < 400
    assert f"--output-dir {out}" in stderr and "--resume" in stderr
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, step + 1))
    resumed = Trainer("tiny-llama", output_dir=str(out), resume=True, **FAST).train(
        EXAMPLES / "chat.jsonl", steps=step + 2
    )
    assert [s for s, _ in resumed.losses] == list(range(1, step + 3))
