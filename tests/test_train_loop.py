"""The training loop on tiny models: API, outputs, resume, OOM recovery, checkpoints, gates."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from backpropagate import Trainer
from backpropagate.errors import RunFailedError, StateError
from backpropagate.train import checkpoint
from backpropagate.train.torch import loop as torch_loop
from backpropagate.train.torch.precision import BF16_CPU_PROBES, compute_dtype_for
from train_helpers import rule_dataset

FAST = dict(progress=False, report_to="none", micro_batch=2, grad_accumulation=2, learning_rate=1e-2)


@pytest.fixture(scope="module")
def dataset():
    return rule_dataset(vocab=300, samples=90, max_seq_length=96, seed=0)


def test_three_line_api_trains_and_writes_everything(tiny_llama, dataset, tmp_path):
    trainer = Trainer("tiny-llama", output_dir=str(tmp_path / "run"), save_every=4, **FAST)
    result = trainer.train(dataset, steps=12)
    assert result.steps == 12 and len(result.losses) == 12
    first, last = np.mean([loss for _, loss in result.losses[:3]]), np.mean([loss for _, loss in result.losses[-3:]])
    assert last < first - 0.2, (first, last)
    assert result.tokens_seen > 0 and result.duration_s > 0 and result.run_id
    assert (result.adapter_dir / "adapter_model.safetensors").exists()
    assert (result.adapter_dir / "adapter_config.json").exists()
    assert (result.adapter_dir / "tokenizer.json").exists()
    assert result.loss_curve and result.loss_curve.read_bytes()[:4] == b"\x89PNG"
    assert (result.adapter_dir / "loss.png").exists()
    run = json.loads(result.run_file.read_text())
    assert run["run_id"] == result.run_id and run["base_model"] == "tiny-llama"
    assert run["method"] == "sft" and run["mode"] == "lora" and run["loss_curve"] == "loss.png"
    assert run["losses"] == result.losses and run["final_loss"] == result.losses[-1][1]
    assert run["hyperparameters"]["lora_r"] == 8 and run["data_hash"]
    assert run["command"].startswith("backprop train --model tiny-llama --steps 12")
    metrics = [json.loads(line) for line in result.metrics_path.read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 13))
    assert {"loss", "lr", "grad_norm", "tokens_per_s"} <= set(metrics[0])
    kept = checkpoint.checkpoints(result.output_dir / "checkpoints")
    assert [p.name for p in kept] == ["step-000008", "step-000012"]


def test_adapter_reloads_with_peft_and_generates(tiny_llama, dataset, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    trainer = Trainer("tiny-llama", output_dir=str(tmp_path / "run"), **FAST)
    result = trainer.train(dataset, steps=3)
    trained = {n: p.detach().clone() for n, p in trainer._trained.model.named_parameters() if "lora_" in n}
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, result.adapter_dir)
    reloaded = dict(model.named_parameters())
    for name, value in trained.items():
        torch.testing.assert_close(reloaded[name.replace(".default.", ".default.")], value)
    assert any(value.abs().sum() > 0 for n, value in trained.items() if "lora_B" in n)
    tok = AutoTokenizer.from_pretrained(result.adapter_dir)
    ids = tok("hello there", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 5


def test_resume_after_interruption_continues_the_same_curve(tiny_llama, dataset, tmp_path, monkeypatch):
    options = dict(FAST, lora_dropout=0.1, save_every=2)
    full = Trainer("tiny-llama", output_dir=str(tmp_path / "full"), **options).train(dataset, steps=6)

    real_save = torch_loop.save_checkpoint

    def save_then_die(root, state, *args, **kwargs):
        path = real_save(root, state, *args, **kwargs)
        if state.step == 4:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(torch_loop, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        Trainer("tiny-llama", output_dir=str(tmp_path / "cut"), **options).train(dataset, steps=6)
    monkeypatch.setattr(torch_loop, "save_checkpoint", real_save)
    cut_run_id = checkpoint.read_state(tmp_path / "cut/checkpoints/step-000004").run_id
    resumed = Trainer("tiny-llama", output_dir=str(tmp_path / "cut"), resume=True, **options).train(dataset, steps=6)
    assert [s for s, _ in resumed.losses] == list(range(1, 7))
    np.testing.assert_allclose(
        [loss for _, loss in resumed.losses], [loss for _, loss in full.losses], rtol=1e-5, atol=1e-6
    )
    assert resumed.run_id == cut_run_id


def test_resume_refuses_changed_settings_and_missing_checkpoints(tiny_llama, dataset, tmp_path):
    Trainer("tiny-llama", output_dir=str(tmp_path / "a"), **FAST).train(dataset, steps=2)
    with pytest.raises(Exception, match="lora_r"):
        Trainer("tiny-llama", output_dir=str(tmp_path / "a"), resume=True, lora_r=4, **FAST).train(dataset, steps=4)
    with pytest.raises(StateError) as err:
        Trainer("tiny-llama", output_dir=str(tmp_path / "b"), resume=True, **FAST).train(dataset, steps=4)
    assert err.value.code == "STATE_CHECKPOINT_NOT_FOUND"
    with pytest.raises(StateError) as err:
        Trainer("tiny-llama", output_dir=str(tmp_path / "a"), **FAST).train(dataset, steps=4)
    assert err.value.code == "STATE_OUTPUT_EXISTS"


def test_out_of_memory_halves_the_micro_batch_and_keeps_the_curve(tiny_llama, dataset, tmp_path, monkeypatch):
    options = dict(FAST, micro_batch=4, grad_accumulation=1)
    real = torch_loop.accumulate_gradients
    calls = []

    def oom_above_one_row_per_batch(tm, objective, batches, graphs, totals, passes):
        calls.append(len(batches))
        if len(batches) < 4:  # more than one packed row per micro-batch
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real(tm, objective, batches, graphs, totals, passes)

    monkeypatch.setattr(torch_loop, "accumulate_gradients", oom_above_one_row_per_batch)
    result = Trainer("tiny-llama", output_dir=str(tmp_path / "oom"), **options).train(dataset, steps=3)
    # The first out-of-memory error moves the recomputed layers' inputs to host memory and
    # retries the same micro-batch; only the next one halves it (twice, down to one row).
    assert calls[:4] == [1, 1, 2, 4]
    run = json.loads(result.run_file.read_text())
    assert run["hyperparameters"]["final_micro_batch"] == 1
    monkeypatch.setattr(torch_loop, "accumulate_gradients", real)
    # One row per micro-batch from the start: the same rows per step, so the same losses.
    plain = Trainer(
        "tiny-llama", output_dir=str(tmp_path / "plain"), **dict(options, micro_batch=1, grad_accumulation=4)
    )
    expected = plain.train(dataset, steps=3)
    np.testing.assert_allclose([loss for _, loss in result.losses], [loss for _, loss in expected.losses], rtol=1e-5)


def test_out_of_memory_at_one_row_is_exhausted(tiny_llama, dataset, tmp_path, monkeypatch):
    def always_oom(tm, objective, batches, graphs, totals, passes):
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    monkeypatch.setattr(torch_loop, "accumulate_gradients", always_oom)
    with pytest.raises(RunFailedError) as err:
        Trainer("tiny-llama", output_dir=str(tmp_path / "oom"), **FAST).train(dataset, steps=2)
    assert err.value.code == "RUNTIME_OOM_RECOVERY_EXHAUSTED"


def test_diverged_loss_stops_the_run_before_a_checkpoint_takes_it(tiny_llama, dataset, tmp_path, monkeypatch):
    """Losses are read a step late; a non-finite one still stops the run, names its step, and is never saved."""
    real = torch_loop.accumulate_gradients
    steps = []

    def nan_at_step_three(tm, objective, batches, graphs, totals, passes):
        loss, tokens = real(tm, objective, batches, graphs, totals, passes)
        steps.append(len(steps) + 1)
        return (loss * float("nan") if len(steps) == 3 else loss), tokens

    monkeypatch.setattr(torch_loop, "accumulate_gradients", nan_at_step_three)
    trainer = Trainer("tiny-llama", output_dir=str(tmp_path / "nan"), save_every=3, **FAST)
    with pytest.raises(RunFailedError) as err:
        trainer.train(dataset, steps=6)
    assert err.value.code == "RUNTIME_TRAINING_DIVERGED" and "at step 3" in str(err.value)
    assert steps == [1, 2, 3]  # the step-3 checkpoint waited for the readout and never happened
    assert checkpoint.checkpoints(tmp_path / "nan" / "checkpoints") == []


def test_accumulation_is_normalised_by_loss_tokens(tiny_llama, dataset, tmp_path):
    # fp32: bf16 matmuls round differently at batch 4 and batch 1, which is not what this checks.
    settings = dict(FAST, precision="fp32")
    one = Trainer("tiny-llama", output_dir=str(tmp_path / "one"), **dict(settings, micro_batch=4, grad_accumulation=1))
    four = Trainer(
        "tiny-llama", output_dir=str(tmp_path / "four"), **dict(settings, micro_batch=1, grad_accumulation=4)
    )
    a, b = one.train(dataset, steps=3), four.train(dataset, steps=3)
    np.testing.assert_allclose([loss for _, loss in a.losses], [loss for _, loss in b.losses], rtol=1e-5)


def test_failed_save_leaves_the_previous_checkpoint_valid(tiny_llama, dataset, tmp_path, monkeypatch):
    out = tmp_path / "run"
    Trainer("tiny-llama", output_dir=str(out), save_every=2, **FAST).train(dataset, steps=2)
    real_write = checkpoint.write_durable

    def fail_on_optimizer_state(path, data):
        if path.name == checkpoint.TRAINING:
            real_write(path, data[: len(data) // 2])
            raise OSError(28, "No space left on device")
        real_write(path, data)

    monkeypatch.setattr(checkpoint, "write_durable", fail_on_optimizer_state)
    with pytest.raises(RunFailedError) as err:
        Trainer("tiny-llama", output_dir=str(out), resume=True, save_every=2, **FAST).train(dataset, steps=4)
    assert err.value.code == "RUNTIME_IO_FAILED"
    assert (out / "checkpoints/step-000004.partial").exists()
    monkeypatch.setattr(checkpoint, "write_durable", real_write)
    assert checkpoint.load_latest(out / "checkpoints").state.step == 2
    result = Trainer("tiny-llama", output_dir=str(out), resume=True, save_every=2, **FAST).train(dataset, steps=4)
    assert result.steps == 4
    assert not list((out / "checkpoints").glob("*.partial"))


def test_a_kill_while_pruning_leaves_no_listed_checkpoint_half_deleted(tmp_path, monkeypatch):
    """Deleting an old checkpoint takes many unlinks: the folder leaves the listing first, by one rename."""
    root = tmp_path / "checkpoints"
    files = {checkpoint.WEIGHTS: b"w", checkpoint.TRAINING: b"t"}
    for step in (1, 2):
        checkpoint.write_checkpoint(root, checkpoint.TrainState("run", step=step), files, keep=2)
    real_rmtree = checkpoint.shutil.rmtree

    def killed_midway(path, *args, **kwargs):  # deleting step 1: its state file goes, then the process dies
        if not (Path(path).name.startswith("step-000001") and (Path(path) / checkpoint.STATE).exists()):
            return real_rmtree(path, *args, **kwargs)
        (Path(path) / checkpoint.STATE).unlink(missing_ok=True)
        raise SystemExit("killed")

    monkeypatch.setattr(checkpoint.shutil, "rmtree", killed_midway)
    with pytest.raises(SystemExit):
        checkpoint.write_checkpoint(root, checkpoint.TrainState("run", step=3), files, keep=2)
    monkeypatch.setattr(checkpoint.shutil, "rmtree", real_rmtree)
    assert [p.name for p in checkpoint.checkpoints(root)] == ["step-000002", "step-000003"]
    assert all(checkpoint.read_state(p).step == int(p.name[5:]) for p in checkpoint.checkpoints(root))
    checkpoint.write_checkpoint(root, checkpoint.TrainState("run", step=4), files, keep=2)  # cleans what the kill left
    assert sorted(p.name for p in root.iterdir()) == ["step-000003", "step-000004"]


def test_a_kill_at_any_instant_leaves_a_valid_checkpoint(tiny_llama, tmp_path):
    out = tmp_path / "run"
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from train_helpers import rule_dataset
        from backpropagate import Trainer
        data = rule_dataset(vocab=300, samples=90, max_seq_length=96, seed=0)
        Trainer("tiny-llama", output_dir={str(out)!r}, save_every=1, keep_checkpoints=2,
                progress=False, report_to="none").train(data, steps=100000)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], env=dict(os.environ), stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while len(checkpoint.checkpoints(out / "checkpoints")) < 2:
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.05)
        time.sleep(float(np.random.default_rng().uniform(0, 0.5)))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    for path in checkpoint.checkpoints(out / "checkpoints"):
        assert checkpoint.read_state(path).step == int(path.name.split("-")[1])
    latest = checkpoint.load_latest(out / "checkpoints")
    dataset = rule_dataset(vocab=300, samples=90, max_seq_length=96, seed=0)
    result = Trainer(
        "tiny-llama", output_dir=str(out), resume=True, save_every=1, progress=False, report_to="none"
    ).train(dataset, steps=latest.state.step + 1)
    assert result.steps == latest.state.step + 1


def test_bf16_on_the_cpu_trains_with_fp32_adapter_masters_and_follows_the_fp32_curve(tiny_llama, dataset, tmp_path):
    curves = {}
    for precision in ("fp32", "bf16"):
        trainer = Trainer("tiny-llama", device="cpu", precision=precision, output_dir=str(tmp_path / precision), **FAST)
        curves[precision] = np.array([loss for _, loss in trainer.train(dataset, steps=12).losses])
        dtypes = {n: p.dtype for n, p in trainer._trained.model.named_parameters()}
    assert {d for n, d in dtypes.items() if "lora_" in n} == {torch.float32}
    assert {d for n, d in dtypes.items() if "lora_" not in n} == {torch.bfloat16}
    bf16 = curves["bf16"]
    assert bf16[-3:].mean() < bf16[:3].mean() - 0.2, bf16
    assert np.abs(bf16 - curves["fp32"]).max() < 0.05 * curves["fp32"].max(), curves


@pytest.mark.parametrize("units", [(), ("_is_avx512_bf16_supported",), ("_is_amx_tile_supported",)])
def test_auto_precision_is_bf16_where_the_hardware_computes_it(monkeypatch, units):
    for probe in BF16_CPU_PROBES:
        monkeypatch.setattr(torch.cpu, probe, lambda probe=probe: probe in units)
    cpu = torch.device("cpu")
    assert compute_dtype_for(cpu) == (torch.bfloat16 if units else torch.float32)
    assert compute_dtype_for(torch.device("cuda")) == torch.bfloat16
    assert compute_dtype_for(cpu, "fp32") == torch.float32  # a value the user gave is kept
    assert compute_dtype_for(torch.device("cuda"), "fp32") == torch.float32


def test_eval_split_reports_held_out_loss(tiny_qwen2, dataset, tmp_path):
    result = Trainer("tiny-qwen2", output_dir=str(tmp_path / "run"), eval_split=0.2, eval_every=2, **FAST).train(
        dataset, steps=4
    )
    assert [s for s, _ in result.eval_losses] == [2, 4]
    assert all(np.isfinite(loss) for _, loss in result.eval_losses)


def test_full_fine_tuning_trains_and_saves_a_model(tiny_qwen2, dataset, tmp_path):
    from transformers import AutoModelForCausalLM

    result = Trainer(
        "tiny-qwen2", mode="full", output_dir=str(tmp_path / "run"), **dict(FAST, learning_rate=3e-3)
    ).train(dataset, steps=6)
    assert result.adapter_dir.name == "model"
    assert result.losses[-1][1] < result.losses[0][1]
    model = AutoModelForCausalLM.from_pretrained(result.adapter_dir)
    assert sum(p.numel() for p in model.parameters()) > 0


def test_full_fine_tuning_is_refused_above_4b_before_loading(tmp_path):
    from transformers import Qwen2Config

    folder = tmp_path / "qwen7b-shape"
    Qwen2Config(
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
    ).save_pretrained(folder)
    with pytest.raises(RunFailedError) as err:
        Trainer(str(folder), mode="full")
    assert err.value.code == "RUNTIME_FULL_FT_MODEL_TOO_LARGE"
    assert "mode='lora'" in err.value.message and "7.6B" in err.value.message


def test_lr_schedule_shapes():
    f = torch_loop.lr_factor
    assert [round(f(s, 4, 20, "constant"), 3) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert f(4, 4, 20, "cosine") == 1.0 and f(19, 4, 20, "cosine") < 0.02
    assert f(12, 4, 20, "linear") == pytest.approx(0.5)


def test_qlora_trains_on_the_cpu_backend_of_bitsandbytes(tiny_llama, dataset, tmp_path):
    result = Trainer("tiny-llama", mode="qlora", output_dir=str(tmp_path / "run"), **FAST).train(dataset, steps=6)
    run = json.loads(result.run_file.read_text())
    assert run["mode"] == "qlora" and any(f.startswith("fused_lora") for f in run["features"])
    assert result.losses[-1][1] < result.losses[0][1]


def test_dora_and_rslora_train(tiny_qwen2, dataset, tmp_path):
    from peft import PeftConfig

    result = Trainer("tiny-qwen2", dora=True, rslora=True, output_dir=str(tmp_path / "run"), **FAST).train(
        dataset, steps=2
    )
    config = PeftConfig.from_pretrained(result.adapter_dir)
    assert config.use_dora and config.use_rslora
    assert all(np.isfinite(loss) for _, loss in result.losses)


def test_recompute_plan_switches_layers_and_backs_off(tiny_llama):
    from transformers import AutoModelForCausalLM, Qwen2Config

    from backpropagate.train.torch.recompute import RecomputePlan, activation_bytes_per_token

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    plan = RecomputePlan(model, "off")
    assert plan.kept == 2 and [layer.gradient_checkpointing for layer in plan.layers] == [False, False]
    assert plan.back_off() and [layer.gradient_checkpointing for layer in plan.layers] == [True, False]
    assert plan.back_off() and plan.describe() == "recompute[2/2]" and not plan.back_off()
    assert RecomputePlan(model, "on").recomputed == RecomputePlan(model, "auto").recomputed == 2
    qwen7b = Qwen2Config(hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4)
    per_token = activation_bytes_per_token(qwen7b, torch.bfloat16)
    assert 150_000 < per_token < 220_000  # ~1.5 GB per layer at 8k tokens


def test_out_of_memory_first_recomputes_kept_layers(tiny_llama, dataset, tmp_path, monkeypatch):
    real = torch_loop.accumulate_gradients

    def oom_while_a_layer_keeps_activations(tm, objective, batches, graphs, totals, passes):
        if tm.recompute.kept:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real(tm, objective, batches, graphs, totals, passes)

    monkeypatch.setattr(torch_loop, "accumulate_gradients", oom_while_a_layer_keeps_activations)
    result = Trainer("tiny-llama", gradient_checkpointing="off", output_dir=str(tmp_path / "run"), **FAST).train(
        dataset, steps=2
    )
    assert "recompute[2/2]" in result.features
    assert json.loads(result.run_file.read_text())["hyperparameters"]["final_micro_batch"] == FAST["micro_batch"]


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_qwen2"])
def test_recomputed_layers_give_kept_layers_gradients_and_skip_the_last_projection(name, request, monkeypatch):
    from backpropagate.config import TrainConfig
    from backpropagate.train.torch import recompute
    from backpropagate.train.torch.attention import packed_attention
    from backpropagate.train.torch.loading import load_for_training
    from backpropagate.train.torch.losses import DeviceBatch, target_logprobs

    config = TrainConfig(mode="lora", device="cpu", lora_r=8, lora_alpha=16.0, progress=False, report_to="none")
    torch.manual_seed(0)
    tm = load_for_training(request.getfixturevalue(name), config)
    with torch.no_grad():
        for param_name, p in tm.model.named_parameters():
            if "lora_B" in param_name:
                p.normal_(0, 0.05)
    data = rule_dataset(vocab=400, samples=12, min_len=5, max_len=30, max_seq_length=96, seed=3)
    batch = DeviceBatch.from_batch(data.batch_of(data.row_samples(0)), tm.device)
    skipped = []
    real = recompute.recomputing
    monkeypatch.setattr(recompute, "recomputing", lambda: skipped.append(real()) or skipped[-1])

    def grads(kept: int) -> dict[str, torch.Tensor]:
        assert tm.recompute is not None
        tm.recompute.set_kept(kept)
        tm.model.zero_grad(set_to_none=True)
        with packed_attention(tm.model):
            (-target_logprobs(torch_loop.forward_hidden(tm, batch), tm.lm_head, batch).sum()).backward()
        return {n: p.grad.clone() for n, p in tm.model.named_parameters() if p.grad is not None}

    layers = len(tm.recompute.layers)
    kept, recomputed = grads(layers), grads(0)
    assert skipped.count(True) == layers  # each recomputation skipped its down-projection matmul
    assert kept.keys() == recomputed.keys() and kept
    for grad_name, grad in kept.items():
        torch.testing.assert_close(recomputed[grad_name], grad, rtol=1e-5, atol=1e-7)
