"""The max-context bench end to end on the tiny shape (CPU): trials in subprocesses, budget, results, table."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benches" / "max_context_gpu.py"


def test_tiny_search_under_a_two_trial_budget(tmp_path):
    command = [sys.executable, str(BENCH), "--shape", "tiny", "--caps", "16", "--which", "ours,peer"]
    command += ["--max-trials", "2", "--start", "256", "--reference-rows", "0", "--results-dir", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env={"PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [json.loads(line) for line in (tmp_path / "max_context_cpu.jsonl").read_text().splitlines()]
    trials = [r for r in lines if r["kind"] == "trial"]
    searches = {r["which"]: r for r in lines if r["kind"] == "search"}
    # One trial each (the budget's share), both trained two steps at the start length.
    assert [(t["which"], t["length"], t["ok"]) for t in trials] == [("peer", 256, True), ("ours", 256, True)]
    assert all(t["tokens_per_s"] > 0 for t in trials)
    assert "fused_lora[14]" in trials[1]["features"]
    # Nothing recomputed on the CPU: no estimate to set against (it is of the all-recomputed step).
    assert "recompute[0/2]" in trials[1]["features"] and trials[1]["estimate_gib"] is None
    for which in ("peer", "ours"):
        assert searches[which]["max_length"] == 256 and searches[which]["at_least"]
        assert searches[which]["stopped"] == "budget"
    assert "≥ 256" in done.stdout and "2 trials in" in done.stdout


def test_a_trial_is_set_against_the_estimate_only_when_it_recomputed_every_layer():
    """The planner fills a cap with kept layers on purpose; the estimate is of the all-recomputed step.

    Where the planner kept some layers' inputs on the card while offloading, the estimate keeps as many.
    """
    sys.path.insert(0, str(BENCH.parent))
    from max_context_gpu import estimate_allocated, estimated_gib

    offloaded = sum(estimate_allocated("llama8b", 24576, "qlora", True).values()) / 2**30
    assert estimated_gib("llama8b", 24576, ["fused_lora[224]", "recompute[32/32]+offload[31/32]"]) == round(
        offloaded, 2
    )
    layer_input_gib = 24576 * 4096 * 2 / 2**30
    partly = estimated_gib("llama8b", 24576, ["recompute[32/32]+offload[20/32]"])  # 12 inputs on the card, not 1
    assert partly == pytest.approx(offloaded + 11 * layer_input_gib, abs=0.01)
    # 29 inputs left the card, 25 stored and 4 replayed in segments of up to 2: 3 on the card, not 1.
    replayed = estimated_gib("llama8b", 24576, ["recompute[32/32]+offload[25/32]+replay[4/32]"])
    assert replayed == pytest.approx(offloaded + 2 * layer_input_gib, abs=0.01)
    # 31 left, 11 stored and 20 replayed in segments of up to 3: the segment's 3, more than the card's 1.
    segment = estimated_gib("llama8b", 24576, ["recompute[32/32]+offload[11/32]+replay[20/32]"])
    assert segment == pytest.approx(offloaded + 2 * layer_input_gib, abs=0.01)
    kept = sum(estimate_allocated("llama8b", 24576, "qlora", False).values()) / 2**30
    assert estimated_gib("llama8b", 24576, ["recompute[32/32]"]) == round(kept, 2) > round(offloaded, 2)
    assert estimated_gib("llama8b", 5120, ["recompute[16/32]"]) is None
    assert estimated_gib("llama8b", 5120, ["fused_lora[224]"]) is None


def test_a_search_stops_before_a_trial_that_could_not_finish(monkeypatch):
    """A longer trial takes at least as long as a shorter one did: with less time left, none is started."""
    import time
    from types import SimpleNamespace

    sys.path.insert(0, str(BENCH.parent))
    import max_context_gpu as bench

    clock = [0.0]
    monkeypatch.setattr(bench, "time", SimpleNamespace(monotonic=lambda: clock[0], perf_counter=time.perf_counter))
    monkeypatch.setattr(bench, "emit", lambda *args: None)

    class Trials:
        args = bench.parse(["--shape", "tiny", "--start", "1024"])
        card, count, lengths = "cpu", 0, []

        def exhausted(self) -> bool:
            return False

        def run(self, which, cap, length, rows, limit_s, gpu) -> dict:
            self.lengths.append(length)
            self.count += 1
            clock[0] += 40
            return {"ok": True, "length": length, "wall_s": 40.0, "tokens_per_s": 1.0}

    trials = Trials()
    found = bench.search(trials, "ours", 16, share_s=100, share_trials=0, gpu=None)
    assert trials.lengths == [1024, 2048]  # then 20 s were left, less than the 40 s a trial took
    assert (found["max_length"], found["at_least"], found["stopped"]) == (2048, True, "budget")


def test_live_at_peak_replays_the_allocator_history():
    """The memory-estimate bench's peak attribution: live blocks at the high-water mark, by allocating line."""
    sys.path.insert(0, str(BENCH.parent))
    from memory_estimate_gpu import live_at_peak

    def frames(line: int) -> list[dict]:
        torch_frame = {"filename": "/site-packages/torch/nn/functional.py", "line": 1, "name": "linear"}
        return [torch_frame, {"filename": "/src/backpropagate/train/torch/attention.py", "line": line, "name": "f"}]

    events = [
        {"action": "alloc", "addr": 1, "size": 100, "frames": frames(10)},
        {"action": "alloc", "addr": 2, "size": 50, "frames": frames(20)},
        {"action": "free_requested", "addr": 1, "size": 100},  # still held until completed
        {"action": "alloc", "addr": 3, "size": 30, "frames": frames(20)},
        {"action": "free_completed", "addr": 1, "size": 100},
        {"action": "free_completed", "addr": 9, "size": 500},  # allocated before the history began
        {"action": "alloc", "addr": 4, "size": 60, "frames": frames(30)},
    ]
    peak, peak_site, sites = live_at_peak(events)
    assert peak == 180 and peak_site == "attention.py:20 f"
    assert sites == [("attention.py:10 f", 100, 1), ("attention.py:20 f", 80, 2)]


def test_a_trial_reports_each_step_and_a_cut_off_trial_keeps_them(tmp_path, capsys):
    """A trial's child prints a line per finished step; a trial stopped by time still reports those steps."""
    sys.path.insert(0, str(BENCH.parent))
    import max_context_gpu as bench

    command = [sys.executable, str(BENCH), "--trial", "ours", "--shape", "tiny", "--cap", "16", "--length", "256"]
    done = subprocess.run([*command, "--steps", "2"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    progress = [json.loads(line[len(bench.PROGRESS) :]) for line in done.stdout.splitlines() if "PROGRESS" in line]
    assert [p["step"] for p in progress] == [1, 2] and all(p["tokens_per_s"] > 0 for p in progress)
    assert done.stdout.splitlines()[-1].startswith(bench.RESULT)

    # The same lines from a child that finished one step and then ran out of time.
    script = f"print({bench.PROGRESS + json.dumps(progress[0])!r}, flush=True); import time; time.sleep(60)"
    outcome = bench.run_child([sys.executable, "-c", script], timeout=10)
    assert outcome["timeout"] and not outcome["ok"] and not outcome["oom"]
    assert outcome["steps_done"] == 1 and outcome["last_step"] == progress[0]
    assert "1 step(s) done" in outcome["error"]
    assert f"step 1: {progress[0]['tokens_per_s']} tok/s" in capsys.readouterr().out  # echoed while it ran
    assert bench.run_child([sys.executable, "-c", "import time; time.sleep(60)"], timeout=3)["steps_done"] == 0
