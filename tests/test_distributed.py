"""Data-parallel training on several processes: real tiny-llama runs over gloo on the CPU.

Each rank is a separate Python process (`distributed_worker.py`) started with the
environment torchrun gives its workers; the single-process runs they are compared with
run here, through the same `Trainer`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from backpropagate import Trainer
from backpropagate.config import TrainConfig
from backpropagate.errors import ConfigError
from backpropagate.train import checkpoint
from backpropagate.train.distributed import World, balanced_shares, check_world
from cli_helpers import run_cli
from train_helpers import rule_dataset

TESTS = Path(__file__).parent
DATASET = dict(vocab=300, samples=90, max_seq_length=96, seed=0)
# Four packed rows a step: two per rank in a world of two, as one micro-batch each. A constant
# learning rate, so that a run of 3 steps resumed to 6 is the run of 6 (a schedule spans the steps asked for).
OPTIONS = dict(
    precision="fp32",  # compared with one process within fp32 rounding
    progress=False,
    report_to="none",
    micro_batch=2,
    grad_accumulation=2,
    learning_rate=1e-2,
    schedule="constant",
    warmup_steps=0,
    eval_split=0.1,  # held-out rows scored in shares by the processes
)
STEPS = 6
# The same sums in another order (per rank, then across ranks) drift by float32 rounding only.
LOSS_RTOL = 1e-4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_world(
    size: int,
    tmp: Path,
    steps: int,
    timeout: float = 150,
    meanwhile: Callable[[list[subprocess.Popen]], None] | None = None,
    **spec: object,
) -> tuple[list[dict], float]:
    """Runs `size` worker processes as one world (`meanwhile` gets them once started); returns each rank's result and the wall time."""
    port = free_port()
    job = {"dataset": DATASET, "steps": steps, **spec}
    procs = []
    started = time.monotonic()
    for rank in range(size):
        env = dict(
            os.environ,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(size),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            OMP_NUM_THREADS="1",
            PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
        )
        result = tmp / f"rank{rank}.json"
        procs.append(
            (
                subprocess.Popen(
                    [sys.executable, str(TESTS / "distributed_worker.py"), json.dumps(job), str(result)], env=env
                ),
                result,
            )
        )
    try:
        if meanwhile is not None:
            meanwhile([proc for proc, _ in procs])
        for proc, _ in procs:
            proc.wait(timeout=max(1.0, timeout - (time.monotonic() - started)))
    finally:
        for proc, _ in procs:
            proc.kill()
    return [json.loads(result.read_text()) for _, result in procs], time.monotonic() - started


def losses(history: list[list[float]]) -> list[float]:
    return [loss for _, loss in history]


@pytest.fixture(scope="module")
def dataset():
    return rule_dataset(**DATASET)


@pytest.fixture(scope="module")
def one_process(tiny_llama, dataset, tmp_path_factory):
    """The uninterrupted single-process run the several-process runs must reproduce (checkpoints at 3 and 6)."""
    out = tmp_path_factory.mktemp("one") / "run"
    return Trainer("tiny-llama", output_dir=str(out), save_every=STEPS // 2, **OPTIONS).train(dataset, steps=STEPS)


def on_two_processes(tmp: Path, options: dict) -> tuple[Path, list]:
    """A run of `options` on two processes, checkpointed half-way: (output folder, each rank's result)."""
    out = tmp / "run"
    ranks, _ = run_world(2, tmp, STEPS, options=dict(options, output_dir=str(out), save_every=STEPS // 2))
    return out, ranks


@pytest.fixture(scope="module")
def two_processes(tiny_llama, tmp_path_factory):
    """The same run on two processes: (output folder, each rank's result)."""
    return on_two_processes(tmp_path_factory.mktemp("two"), OPTIONS)


def cut_after_half(run: Path, tmp: Path, final: str = "adapter") -> Path:
    """A copy of a finished run as a kill right after its middle checkpoint would have left it."""
    cut = tmp / f"{run.parent.name}-cut"
    shutil.copytree(run, cut)
    shutil.rmtree(cut / "checkpoints" / f"step-{STEPS:06d}")
    shutil.rmtree(cut / final)
    return cut


@pytest.mark.slow
def test_two_processes_train_like_one_at_the_same_global_batch(one_process, two_processes):
    out, ranks = two_processes
    assert ranks[0]["losses"] == ranks[1]["losses"]  # every rank holds the global loss
    np.testing.assert_allclose(losses(ranks[0]["losses"]), losses(one_process.losses), rtol=LOSS_RTOL)
    assert ranks[0]["eval_losses"] == ranks[1]["eval_losses"]
    np.testing.assert_allclose(losses(ranks[0]["eval_losses"]), losses(one_process.eval_losses), rtol=LOSS_RTOL)
    assert ranks[0]["digest"] == ranks[1]["digest"]  # the same update on every rank: identical adapters
    ours = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    theirs = load_file(str(one_process.adapter_dir / "adapter_model.safetensors"))
    assert ours.keys() == theirs.keys()
    for name in ours:
        np.testing.assert_allclose(ours[name], theirs[name], rtol=1e-3, atol=1e-5)
    # Rank 0 alone writes metrics: one record per step, and one of the evaluation.
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [*range(1, STEPS + 1), STEPS]
    assert "eval_loss" in records[-1]


@pytest.mark.slow
def test_resume_across_world_sizes_continues_the_same_curve(one_process, two_processes, dataset, tmp_path):
    expected = losses(one_process.losses)
    # 2 -> 1: one process finishes what two processes checkpointed at half the run.
    two_first = cut_after_half(two_processes[0], tmp_path)
    finished = Trainer("tiny-llama", output_dir=str(two_first), resume=True, **OPTIONS).train(dataset, steps=STEPS)
    np.testing.assert_allclose(losses(finished.losses), expected, rtol=LOSS_RTOL)
    # 1 -> 2: two processes finish what one process checkpointed at half the run.
    one_first = cut_after_half(one_process.output_dir, tmp_path)
    ranks, _ = run_world(2, tmp_path, STEPS, options=dict(OPTIONS, output_dir=str(one_first), resume=True))
    np.testing.assert_allclose(losses(ranks[1]["losses"]), expected, rtol=LOSS_RTOL)
    assert ranks[0]["digest"] == ranks[1]["digest"]


@pytest.mark.slow
def test_an_error_on_one_rank_stops_every_rank_naming_it(tiny_llama, tmp_path):
    missing = tmp_path / "missing.jsonl"
    ranks, wall = run_world(
        2, tmp_path, STEPS, options=dict(OPTIONS, output_dir=str(tmp_path / "run")), data=str(missing), data_ranks=[1]
    )
    assert ranks[1]["code"] == "INPUT_FILE_NOT_FOUND" and ranks[1]["message"].startswith("rank 1 of 2: ")
    assert ranks[0]["code"] == "RUNTIME_DISTRIBUTED_FAILED"
    assert "rank 1 failed: [INPUT_FILE_NOT_FOUND]" in ranks[0]["message"]
    assert wall < 90  # both ended on their own, long before the process group's timeout


@pytest.mark.slow
def test_a_signal_to_one_rank_stops_every_rank_after_the_same_step(tiny_llama, tmp_path):
    out = tmp_path / "run"

    def terminate_rank_1_once_training(procs: list[subprocess.Popen]) -> None:
        deadline = time.monotonic() + 120
        while not (out / "metrics.jsonl").is_file() or not (out / "metrics.jsonl").read_text():
            assert time.monotonic() < deadline, "the run never started its steps"
            time.sleep(0.05)
        procs[1].send_signal(signal.SIGTERM)

    ranks, _ = run_world(
        2,
        tmp_path,
        500,
        options=dict(OPTIONS, output_dir=str(out), save_every=0),
        meanwhile=terminate_rank_1_once_training,
    )
    assert [rank["code"] for rank in ranks] == ["RUNTIME_TERMINATED", "RUNTIME_TERMINATED"]
    (saved,) = checkpoint.checkpoints(out / "checkpoints")  # one checkpoint, of the step both stopped after
    step = checkpoint.read_state(saved).step
    assert (
        1 <= step < 500
        and f"after step {step} of 500" in ranks[0]["message"]
        and f"after step {step} " in ranks[1]["message"]
    )


# FSDP needs the mode spelled out (auto would be QLoRA on CUDA).
FSDP_LORA = dict(OPTIONS, fsdp=True, mode="lora")
# Three packed rows a step: one rank runs two micro-batches, the other one and a padding pass.
FULL = dict(OPTIONS, mode="full", micro_batch=1, grad_accumulation=3)


@pytest.fixture(scope="module")
def fsdp_lora(tiny_llama, tmp_path_factory):
    """The LoRA run of `one_process` on two processes with the model sharded: (output folder, each rank's result)."""
    return on_two_processes(tmp_path_factory.mktemp("fsdp"), FSDP_LORA)


@pytest.fixture(scope="module")
def one_process_full(tiny_llama, dataset, tmp_path_factory):
    """A single-process full fine-tune (checkpoints at 3 and 6), the reference of the sharded ones."""
    out = tmp_path_factory.mktemp("one-full") / "run"
    return Trainer("tiny-llama", output_dir=str(out), save_every=STEPS // 2, **FULL).train(dataset, steps=STEPS)


@pytest.mark.slow
def test_fsdp_lora_trains_like_one_process(one_process, fsdp_lora):
    out, ranks = fsdp_lora
    assert ranks[0]["losses"] == ranks[1]["losses"]
    np.testing.assert_allclose(losses(ranks[0]["losses"]), losses(one_process.losses), rtol=LOSS_RTOL)
    np.testing.assert_allclose(losses(ranks[0]["eval_losses"]), losses(one_process.eval_losses), rtol=LOSS_RTOL)
    assert ranks[0]["digest"] == ranks[1]["digest"]  # the shards gathered: one adapter
    ours = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    theirs = load_file(str(one_process.adapter_dir / "adapter_model.safetensors"))
    assert ours.keys() == theirs.keys()
    for name in ours:
        np.testing.assert_allclose(ours[name], theirs[name], rtol=1e-3, atol=1e-5)


@pytest.mark.slow
def test_an_fsdp_checkpoint_is_the_one_format_and_resumes_in_one_process(one_process, fsdp_lora, dataset, tmp_path):
    sharded, whole = (
        checkpoint.load(fsdp_lora[0] / "checkpoints" / "step-000003"),
        checkpoint.load(one_process.output_dir / "checkpoints" / "step-000003"),
    )
    assert sharded.weights.keys() == whole.weights.keys()
    for name, tensor in sharded.weights.items():
        assert tensor.shape == whole.weights[name].shape  # whole tensors, not rank 0's shard
    optim, reference = sharded.training["optimizer"], whole.training["optimizer"]
    assert optim["state"].keys() == reference["state"].keys()
    assert [g["params"] for g in optim["param_groups"]] == [g["params"] for g in reference["param_groups"]]
    for i, moments in optim["state"].items():
        assert moments["exp_avg"].shape == reference["state"][i]["exp_avg"].shape
    cut = cut_after_half(fsdp_lora[0], tmp_path)
    finished = Trainer("tiny-llama", output_dir=str(cut), resume=True, **dict(OPTIONS, mode="lora")).train(
        dataset, steps=STEPS
    )
    np.testing.assert_allclose(losses(finished.losses), losses(one_process.losses), rtol=LOSS_RTOL)


def full_model_close(ours: Path, theirs: Path, atol: float = 1e-5) -> None:
    mine, reference = load_file(str(ours / "model.safetensors")), load_file(str(theirs / "model.safetensors"))
    assert mine.keys() == reference.keys()
    for name in mine:
        np.testing.assert_allclose(mine[name], reference[name], rtol=1e-3, atol=atol, err_msg=name)


@pytest.mark.slow
def test_fsdp_full_fine_tuning_trains_like_one_process(one_process_full, tmp_path):
    out = tmp_path / "run"
    ranks, _ = run_world(2, tmp_path, STEPS, options=dict(FULL, fsdp=True, output_dir=str(out)))
    assert ranks[0]["digest"] == ranks[1]["digest"]
    np.testing.assert_allclose(losses(ranks[0]["losses"]), losses(one_process_full.losses), rtol=LOSS_RTOL)
    full_model_close(out / "model", one_process_full.adapter_dir)


@pytest.mark.slow
def test_fsdp_resumes_a_one_process_checkpoint(one_process_full, tmp_path):
    """The whole weights and optimizer state of a checkpoint, sharded into the processes, continue the curve."""
    cut = cut_after_half(one_process_full.output_dir, tmp_path, final="model")
    ranks, _ = run_world(2, tmp_path, STEPS, options=dict(FULL, fsdp=True, output_dir=str(cut), resume=True))
    np.testing.assert_allclose(losses(ranks[0]["losses"]), losses(one_process_full.losses), rtol=LOSS_RTOL)
    full_model_close(cut / "model", one_process_full.adapter_dir)


def tied_copy(model: Path, folder: Path) -> Path:
    """`model` with its LM head tied to the input embeddings (one tensor, as in Llama 3.2 1B or Qwen2.5)."""
    shutil.copytree(model, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    weights = load_file(str(folder / "model.safetensors"))
    del weights["lm_head.weight"]
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


@pytest.mark.slow
def test_fsdp_keeps_a_tied_lm_head_whole(tiny_llama, tmp_path):
    """The tied embedding is the head the loss reads: left out of the shards, its gradient summed with the loss."""
    tied = tied_copy(tiny_llama, tmp_path / "tied")
    # The reference runs in a worker process too, one thread as each rank has: this process's
    # thread count and earlier tests' state would change its fp32 summation order.
    (tmp_path / "one").mkdir()
    one = tmp_path / "one" / "run"
    (reference,), _ = run_world(1, tmp_path / "one", 4, model=str(tied), options=dict(FULL, output_dir=str(one)))
    out = tmp_path / "run"
    ranks, _ = run_world(2, tmp_path, 4, model=str(tied), options=dict(FULL, fsdp=True, output_dir=str(out)))
    np.testing.assert_allclose(losses(ranks[0]["losses"]), losses(reference["losses"]), rtol=LOSS_RTOL)
    # Two of the tied matrix's 36608 weights step 4e-5 apart: their gradients (sums over both of its
    # uses) are near AdamW's eps of 1e-8, where fp32 summation order moves a step by a fraction of lr.
    full_model_close(out / "model", one / "model", atol=1e-4)
    assert "lm_head.weight" not in load_file(str(out / "model" / "model.safetensors"))


BUCKETS_SCRIPT = """
import os, sys, torch, torch.distributed as dist
from backpropagate.train import distributed
distributed.BUCKET_ELEMENTS = 5  # several buckets, one tensor larger than a bucket
world = distributed.join("cpu")
params = [torch.nn.Parameter(torch.zeros(n)) for n in (3, 7, 2, 4)]
for i, p in enumerate(params[:-1]):  # the last has no gradient on this rank
    p.grad = torch.full_like(p, (world.rank + 1) * (i + 1))
loss = world.reduce_gradients(params, torch.tensor(world.rank + 0.5))
sums = [p.grad.tolist() for p in params]
assert sums == [[3.0 * (i + 1)] * p.numel() for i, p in enumerate(params[:-1])] + [[0.0] * 4], sums
assert loss.item() == 2.0, loss
"""


def test_gradients_and_loss_are_summed_over_ranks_in_buckets(tmp_path):
    port = free_port()
    env = dict(os.environ, WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen([sys.executable, "-c", BUCKETS_SCRIPT], env=dict(env, RANK=str(r), LOCAL_RANK=str(r)))
        for r in range(2)
    ]
    assert [proc.wait(timeout=120) for proc in procs] == [0, 0]


def test_step_rows_are_shared_by_tokens_not_rows():
    rng = np.random.default_rng(0)
    for parts in (2, 3, 4):
        tokens = np.concatenate([rng.integers(1, 20, 40), rng.integers(500, 2000, 5)])  # many short rows, a few long
        rng.shuffle(tokens)
        shares = balanced_shares(tokens, parts)
        assert sorted(np.concatenate(shares).tolist()) == list(range(len(tokens)))  # each row exactly once
        assert all((np.diff(share) > 0).all() for share in shares)  # in stream order
        loads = [int(tokens[share].sum()) for share in shares]
        assert max(loads) - min(loads) <= tokens.max()
    # Halves by row count would give one rank 2000 tokens and the other 30.
    tokens = np.array([1000, 990, 10, 10, 10, 10])
    assert [int(tokens[share].sum()) for share in balanced_shares(tokens, 2)] == [1020, 1010]


@pytest.mark.parametrize(
    ("world", "options", "rows", "refused"),
    [
        (World(0, 1), dict(gpus=2), 4, "gpus=2 needs 2 processes"),
        (World(1, 2), dict(gpus=4), 4, "gpus=4 needs 4 processes"),
        (World(0, 2), {}, 1, "a step of 1 packed row(s) cannot feed 2 processes"),
        (World(0, 2), dict(device="cuda:1"), 4, "device='cuda:1' is invalid"),
        (World(0, 1), dict(fsdp=True, mode="lora"), 4, "fsdp=True shards the model over several processes"),
        (World(0, 2), dict(fsdp=True), 4, "mode='auto' is invalid: expected lora or full with fsdp=True"),
        (World(0, 2), dict(fsdp=True, mode="qlora"), 4, "mode='qlora' is invalid: expected lora or full"),
    ],
)
def test_worlds_that_cannot_train_are_refused_before_loading(world, options, rows, refused):
    config = TrainConfig(**options)
    with pytest.raises(ConfigError, match=re.escape(refused)):
        check_world(world, config, rows)
    check_world(World(0, 2), TrainConfig(gpus=2), 2)  # one row per process is enough


def test_more_gpus_than_the_machine_has_are_refused(tiny_llama):
    result = run_cli("train", "--gpus", "2", "--steps", "1")
    assert result.status != 0
    assert "[DEP_GPU_NOT_AVAILABLE]" in result.stderr and "2 CUDA devices" in result.stderr


def test_fsdp_in_one_process_is_refused_with_its_code(tiny_llama, tmp_path):
    result = run_cli("train", "--fsdp", "--mode", "lora", "--steps", "1", "--output", str(tmp_path / "run"))
    assert result.status != 0
    assert "[CONFIG_INVALID_SETTING]: fsdp=True shards the model over several processes" in result.stderr


@pytest.mark.slow
def test_gpus_on_the_cpu_starts_the_processes_and_rank_0_reports(tiny_llama, tmp_path):
    """`backprop train --gpus 2 --device cpu`: torch.distributed.run, `python -m backpropagate`, gloo."""
    out = tmp_path / "run"
    command = [sys.executable, "-m", "backpropagate", "train", "--gpus", "2", "--device", "cpu", "--steps", "2"]
    command += ["--micro-batch", "1", "--grad-accumulation", "2", "--no-progress", "--report-to", "none"]
    done = subprocess.run([*command, "--output", str(out), "--json"], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout)  # one summary: rank 0's
    assert summary["steps"] == 2 and summary["adapter_dir"] == str(out / "adapter")
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
