"""Honest speed figures: a step's tokens/s is its tokens over its own wall time, and the bar's ETA follows real steps."""

import json
import re
import time

import pytest

from backpropagate import Trainer
from backpropagate.train import metrics
from backpropagate.train.torch import loop as torch_loop
from train_helpers import rule_dataset

OPTIONS = dict(report_to="none", micro_batch=2, grad_accumulation=2, learning_rate=1e-3, save_every=0)
STEPS = 16


@pytest.fixture(scope="module")
def dataset():
    return rule_dataset(vocab=300, samples=200, max_seq_length=96, seed=1)


def median_rate(records: list[dict]) -> float:
    return sorted(r["tokens_per_s"] for r in records)[len(records) // 2]


def timed_loop(monkeypatch) -> dict[str, float]:
    """Wall time of the training loop, clocked around it from outside."""
    wall: dict[str, float] = {}
    real = torch_loop.train

    def timed(*args, **kwargs):
        started = time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            wall["s"] = time.perf_counter() - started

    monkeypatch.setattr(torch_loop, "train", timed)
    return wall


def test_metrics_tokens_per_s_is_each_steps_own_rate(tiny_llama, dataset, tmp_path, monkeypatch):
    wall = timed_loop(monkeypatch)
    result = Trainer("tiny-llama", output_dir=str(tmp_path / "run"), progress=False, **OPTIONS).train(
        dataset, steps=STEPS
    )
    records = [json.loads(line) for line in result.metrics_path.read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    step_s = [r["tokens"] / r["tokens_per_s"] for r in records]
    # Steps neither overlap nor claim time outside the loop ...
    assert sum(step_s) <= wall["s"]
    # ... and on the CPU a step's record is written as soon as its work is done, so the time between the
    # first and the last record is steps 2..N plus metrics writes: nearly all step time (1% and 5 ms
    # for the records' rounding: times to the millisecond, rates to a tenth of a token per second).
    between = records[-1]["time"] - records[0]["time"]
    assert 0.5 * between <= sum(step_s[1:]) <= 1.01 * between + 0.005, (sum(step_s[1:]), between)
    # No step is timed as a sliver of itself (a shared machine may still make single steps vary).
    assert max(r["tokens_per_s"] for r in records) <= 10 * median_rate(records)


def test_progress_bar_shows_the_measured_rate(tiny_llama, dataset, tmp_path, capsys):
    result = Trainer("tiny-llama", output_dir=str(tmp_path / "run"), progress=True, **OPTIONS).train(
        dataset, steps=STEPS
    )
    shown = re.findall(r"([\d,]+) tok/s", capsys.readouterr().err)
    assert shown, "the bar printed no rate"
    rate = float(shown[-1].replace(",", ""))
    records = [json.loads(line) for line in result.metrics_path.read_text().splitlines()]
    assert rate == pytest.approx(records[-1]["tokens_per_s"], rel=0.01, abs=1)
    assert rate <= 10 * median_rate(records)  # never the millions of tokens/s of a mistimed step


def test_eta_is_remaining_steps_times_the_median_step():
    assert metrics.eta_seconds([], 10) is None
    assert metrics.eta_seconds([9.0, 1.0, 1.2, 0.8], 10) == pytest.approx(11.0)  # the slow first step is left out
    assert metrics.eta_seconds([2.0], 0) == 0
    assert metrics.format_duration(None) == "-:--:--"
    assert metrics.format_duration(3725.4) == "1:02:05"


def test_progress_bar_times_steps_between_its_updates():
    bar = metrics.ProgressBar(total=100, start=10, enabled=False)
    time.sleep(0.05)
    bar.update(12, 1.0, 100.0)  # two steps since the bar was made
    time.sleep(0.02)
    bar.update(13, 1.0, 100.0)
    first, second = bar.intervals
    assert 0.02 <= first < 0.05 and 0.015 <= second < 0.05
    assert metrics.eta_seconds(bar.intervals, 87) == pytest.approx(87 * (first + second) / 2)
