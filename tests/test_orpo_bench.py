"""The ORPO GPU benchmark script's quick mode runs on CPU and compares with the peer's line."""

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benches" / "orpo_gpu.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("orpo_gpu", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_run_writes_results_and_compares_with_the_peer(tiny_qwen2, tmp_path, monkeypatch, capsys):
    bench = load_bench()
    monkeypatch.setattr(bench, "OUT", tmp_path)
    peer = {"tool": bench.PEER_TOOL, "pairs_per_step": 4, "pairs_per_s": 0.1, "peak_mem_gib": 19.1}
    log = tmp_path / "peer_orpo.log"
    log.write_text("{'train_runtime': 1.0}\n" + json.dumps(peer) + "\n")
    assert bench.main(["--quick", "--variants", "lora", "--peer-log", str(log)]) == 0
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [r["variant"] for r in rows] == ["bp_orpo_lora"]
    row = rows[0]
    assert row["pairs_per_s"] > 0 and row["shared_prompt"] and row["stored_tokens_per_pair"] < row["tokens_per_pair"]
    out = capsys.readouterr().out
    assert f"{row['pairs_per_s'] / 0.1:.2f}x pairs/s" in out and "peer trl.ORPOTrainer+peft" in out


def test_rows_are_drawn_like_the_peers():
    bench = load_bench()
    rows = bench.peer_rows(3, 80, 250)
    assert len(rows) == 3 and all(len(r["prompt"].split()) == 80 and len(r["chosen"].split()) == 250 for r in rows)
    assert rows == bench.peer_rows(3, 80, 250)
