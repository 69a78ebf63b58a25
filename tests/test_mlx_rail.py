"""The MLX rail trained for real on the CPU (mlx-lm[cpu]): parity with the torch rail, packing,
PEFT-format adapters, resume, modes, preference losses, refusals and the CLI to GGUF."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("mlx_lm")

import mlx.core as mx  # noqa: E402

from backpropagate import Trainer  # noqa: E402
from backpropagate.backends.loading import load_for_training  # noqa: E402
from backpropagate.config import TrainConfig  # noqa: E402
from backpropagate.errors import ConfigError, DependencyError  # noqa: E402
from backpropagate.train.mlx import loop as mlx_loop  # noqa: E402
from backpropagate.train.mlx import model as mlx_model  # noqa: E402
from backpropagate.train.mlx.adapters import load_peft_state  # noqa: E402
from backpropagate.train.mlx.losses import MlxObjective, per_sample, target_logprobs  # noqa: E402
from backpropagate.trainer import seed_everything  # noqa: E402
from train_helpers import rule_dataset  # noqa: E402

FAST = dict(progress=False, report_to="none", micro_batch=2, grad_accumulation=2, learning_rate=1e-2)


@pytest.fixture(scope="module")
def dataset():
    return rule_dataset(vocab=300, samples=60, max_seq_length=96, seed=0)


def options(**overrides) -> dict:
    return dict(FAST, lora_r=8, lora_alpha=16.0, max_seq_length=96, **overrides)


def config(**overrides) -> TrainConfig:
    return Trainer("tiny-llama", backend="mlx", **options(**overrides)).config


def mlx_from_torch_init(path: Path, cfg: TrainConfig) -> mlx_model.MlxTrainingModel:
    """An MLX model whose adapter starts from the torch rail's initial adapter (what Trainer's seeding makes)."""
    from peft import get_peft_model_state_dict

    seed_everything(cfg.seed)
    adapter = get_peft_model_state_dict(load_for_training(path, cfg).model)
    tm = mlx_model.load_for_training(path, cfg)
    load_peft_state(tm, {k: v.detach().numpy() for k, v in adapter.items()})
    return tm


def test_torch_and_mlx_draw_the_same_loss_curve(tiny_llama, dataset, tmp_path):
    """Same data, initial adapter and hyperparameters: per-step losses agree within 2e-4 (relative) over 20 steps."""
    settings = options(max_grad_norm=1.0, warmup_steps=3)
    ours = Trainer("tiny-llama", backend="torch", output_dir=str(tmp_path / "torch"), **settings).train(dataset, 20)
    cfg = config(max_grad_norm=1.0, warmup_steps=3)
    theirs = mlx_loop.train(mlx_from_torch_init(tiny_llama, cfg), dataset, cfg, 20, tmp_path / "mlx", "m", {})
    torch_losses = [loss for _, loss in ours.losses]
    mlx_losses = [loss for _, loss in theirs.state.losses]
    assert len(mlx_losses) == 20 and mlx_losses[-1] < mlx_losses[0] - 0.3
    np.testing.assert_allclose(mlx_losses, torch_losses, rtol=2e-4)


def test_packed_samples_keep_their_unpacked_loss(tiny_llama, dataset):
    cfg = config()
    tm = mlx_model.load_for_training(tiny_llama, cfg)
    objective = MlxObjective(cfg, dataset)
    rows = np.arange(3)
    pieces = mlx_loop.micro_pieces(dataset, rows, 3)
    (batch, row_tokens) = pieces[0]
    assert len(batch.sample_index) > len(rows)  # several samples share a packed row
    packed = objective.layout(batch, row_tokens)
    sums, _ = per_sample(target_logprobs(tm.net, packed), packed, packed.num_samples)
    for i, sample in enumerate(batch.sample_index):
        alone = dataset.batch_of(np.array([sample]))
        one = objective.layout(alone, [alone.num_tokens])
        np.testing.assert_allclose(float(sums[i]), float(target_logprobs(tm.net, one).sum()), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("variant", [{}, {"dora": True}, {"rslora": True, "lora_dropout": 0.1}])
def test_mlx_adapter_loads_in_peft_with_the_same_logits(tiny_llama, dataset, tmp_path, variant):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    trainer = Trainer("tiny-llama", backend="mlx", output_dir=str(tmp_path / "run"), lora_r=4, **FAST, **variant)
    result = trainer.train(dataset, steps=3)
    adapter = result.adapter_dir
    saved = json.loads((adapter / "adapter_config.json").read_text())
    assert saved["use_dora"] == bool(variant.get("dora")) and saved["use_rslora"] == bool(variant.get("rslora"))
    assert {"adapter_model.safetensors", "backpropagate_run.json", "loss.png"} <= {p.name for p in adapter.iterdir()}
    assert (tmp_path / "run/metrics.jsonl").read_text().count('"loss"') == 3
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, adapter).eval()
    ids = np.random.default_rng(1).integers(0, 300, size=(1, 40))
    with torch.no_grad():
        want = peft_model(torch.tensor(ids)).logits.numpy()
    net = trainer._trained.net
    net.eval()
    got = np.array(net(mx.array(ids)))
    np.testing.assert_allclose(got, want, atol=2e-4)
    moved = np.abs(want - AutoModelForCausalLM.from_pretrained(tiny_llama)(torch.tensor(ids)).logits.detach().numpy())
    assert moved.max() > 1e-3  # the adapter changed the model


def test_resume_after_interruption_continues_the_same_curve(tiny_llama, dataset, tmp_path, monkeypatch):
    options = dict(FAST, backend="mlx", lora_dropout=0.1, save_every=2)
    full = Trainer("tiny-llama", output_dir=str(tmp_path / "full"), **options).train(dataset, steps=6)
    real_save = mlx_loop.save_checkpoint

    def save_then_die(root, state, *args, **kwargs):
        path = real_save(root, state, *args, **kwargs)
        if state.step == 4:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(mlx_loop, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        Trainer("tiny-llama", output_dir=str(tmp_path / "cut"), **options).train(dataset, steps=6)
    monkeypatch.setattr(mlx_loop, "save_checkpoint", real_save)
    assert sorted(p.name for p in (tmp_path / "cut/checkpoints").iterdir()) == ["step-000002", "step-000004"]
    resumed = Trainer("tiny-llama", output_dir=str(tmp_path / "cut"), resume=True, **options).train(dataset, steps=6)
    assert [s for s, _ in resumed.losses] == list(range(1, 7))
    np.testing.assert_allclose([v for _, v in resumed.losses], [v for _, v in full.losses], rtol=1e-6)


def test_unsupported_combinations_are_refused_up_front(tiny_llama):
    with pytest.raises(ConfigError, match="method='kto'") as err:
        Trainer("tiny-llama", backend="mlx", method="kto")
    assert err.value.code == "CONFIG_INVALID_SETTING"
    with pytest.raises(ConfigError, match="optimizer='adamw_8bit'"):
        Trainer("tiny-llama", backend="mlx", optimizer="adamw_8bit")
    with pytest.raises(ConfigError, match="backend='cuda'"):
        Trainer("tiny-llama", backend="cuda")


def test_missing_mlx_is_a_coded_error_with_the_install_line(tiny_llama, dataset, tmp_path, monkeypatch):
    import backpropagate.train.mlx as rail

    monkeypatch.setattr(rail, "mlx_importable", lambda: False)
    with pytest.raises(DependencyError, match=r"pip install 'backpropagate\[mlx\]'") as err:
        Trainer("tiny-llama", backend="mlx", output_dir=str(tmp_path / "x"), **FAST).train(dataset, steps=1)
    assert err.value.code == "DEP_MLX_UNAVAILABLE"
