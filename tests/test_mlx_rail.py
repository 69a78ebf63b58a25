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
from backpropagate.config import TrainConfig  # noqa: E402
from backpropagate.errors import ConfigError, DependencyError  # noqa: E402
from backpropagate.train.mlx import loop as mlx_loop  # noqa: E402
from backpropagate.train.mlx import model as mlx_model  # noqa: E402
from backpropagate.train.mlx.adapters import load_peft_state  # noqa: E402
from backpropagate.train.mlx.losses import (  # noqa: E402
    MlxObjective,
    line_width,
    pack_lines,
    per_sample,
    target_logprobs,
)
from backpropagate.train.torch import loop as torch_loop  # noqa: E402
from backpropagate.train.torch.loading import load_for_training  # noqa: E402
from backpropagate.trainer import seed_everything  # noqa: E402
from train_helpers import rule_dataset  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[1] / "python/backpropagate/examples"
FAST = dict(progress=False, report_to="none", micro_batch=2, grad_accumulation=2, learning_rate=1e-2)


@pytest.fixture(scope="module")
def dataset():
    return rule_dataset(vocab=300, samples=60, max_seq_length=96, seed=0)


def options(**overrides) -> dict:
    return {**FAST, "lora_r": 8, "lora_alpha": 16.0, "max_seq_length": 96, **overrides}


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
    objective = MlxObjective(cfg, dataset, tm.attention_share)
    batch = torch_loop.micro_batches(dataset, np.arange(3), 3)[0]
    packed = objective.layout(batch)
    assert packed.input_ids.shape[0] < len(batch.sample_index)  # samples share lines
    sums, _ = per_sample(target_logprobs(tm.net, packed), packed, packed.num_samples)
    for i, sample in enumerate(batch.sample_index):
        alone = dataset.batch_of(np.array([sample]))
        one = objective.layout(alone)
        np.testing.assert_allclose(float(sums[i]), float(target_logprobs(tm.net, one).sum()), rtol=1e-5, atol=1e-4)


def test_lines_balance_tail_padding_against_masked_attention():
    lengths = np.array([60, 50, 40, 30, 20, 10, 5])
    assert sorted(sum(lengths[s] for s in line) for line in pack_lines(lengths, 64)) == [35, 60, 60, 60]
    nines = np.full(8, 9)
    assert line_width(nines, attention_share=0.0) == 32  # least padding: 3 lines of 32
    assert line_width(nines, attention_share=1.0) == 16  # attention dear: the narrowest lines


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


@pytest.fixture(scope="module")
def pairs(tiny_llama):
    from backpropagate.data import DataConfig, prepare

    return prepare(EXAMPLES / "preference.jsonl", tiny_llama, DataConfig(max_seq_length=256))


@pytest.mark.parametrize(
    "method, knobs",
    [("orpo", {}), ("orpo", {"orpo_prompt_loss": True}), ("simpo", {}), ("simpo", {"simpo_alpha": 0.5})],
)
def test_preference_losses_match_the_torch_rail(tiny_llama, pairs, method, knobs):
    """The MLX twins of ORPO and SimPO give the torch rail's loss terms on the same batch and weights."""
    from peft import get_peft_model_state_dict

    from backpropagate.train.torch.attention import packed_attention
    from backpropagate.train.torch.objectives import objective_for

    cfg = config(method=method, max_seq_length=256, **knobs)
    seed_everything(cfg.seed)
    torch_tm = load_for_training(tiny_llama, cfg)
    with torch.no_grad():  # a trained-looking adapter, so that it matters
        for name, param in torch_tm.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    mlx_tm = mlx_model.load_for_training(tiny_llama, cfg)
    load_peft_state(mlx_tm, {k: v.detach().numpy() for k, v in get_peft_model_state_dict(torch_tm.model).items()})
    batch = torch_loop.micro_batches(pairs, np.arange(min(3, pairs.num_rows)), 3)[0]
    assert len(batch.sample_index) >= 4  # at least two pairs
    theirs = objective_for(cfg, pairs, torch_loop.policy_of(torch_tm))
    with packed_attention(torch_tm.model), torch.no_grad():
        device_batch = theirs.device_batch(batch, torch_tm.device)
        hidden = torch_loop.forward_hidden(torch_tm, device_batch)
        want = theirs.loss_sum(hidden, torch_tm.lm_head, device_batch).reshape(-1).numpy()
    ours = MlxObjective(cfg, pairs, mlx_tm.attention_share)
    got = np.array(ours.loss_terms(mlx_tm.net, ours.layout(batch)))
    # Both rails compute in the model's bf16; the torch rail adds a wide layer's adapter inside the
    # base matmul (lora_concat), MLX after it: their sums round differently, by up to ~2e-4 here.
    np.testing.assert_allclose(got, want, rtol=5e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["orpo", "simpo"])
def test_preference_methods_train_on_mlx(tiny_llama, tmp_path, method):
    data = EXAMPLES / "preference.jsonl"
    result = Trainer("tiny-llama", backend="mlx", method=method, output_dir=str(tmp_path / method), **FAST).train(
        data, steps=2
    )
    assert len(result.losses) == 2 and all(np.isfinite(v) for _, v in result.losses)
    assert (result.adapter_dir / "adapter_model.safetensors").exists()


def test_qlora_quantizes_an_hf_folder_on_load(tiny_llama, dataset, tmp_path):
    trainer = Trainer("tiny-llama", backend="mlx", mode="qlora", output_dir=str(tmp_path / "q"), **FAST)
    result = trainer.train(dataset, steps=4)
    assert any(f.startswith("quantized_on_load") for f in result.features)
    assert result.losses[-1][1] < result.losses[0][1]
    import mlx.nn as nn

    assert isinstance(trainer._trained.net.model.layers[0].self_attn.q_proj.base, nn.QuantizedLinear)
    saved = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str(tiny_llama)


def test_an_mlx_quantized_folder_trains_as_qlora(tiny_llama, dataset, tmp_path):
    from mlx_lm.convert import convert

    folder = tmp_path / "tiny-llama-4bit"
    convert(str(tiny_llama), str(folder), quantize=True, q_group_size=64, q_bits=4)
    result = Trainer(str(folder), backend="mlx", output_dir=str(tmp_path / "run"), **FAST).train(dataset, steps=2)
    assert not any(f.startswith("quantized_on_load") for f in result.features)
    run = json.loads(result.run_file.read_text())
    assert run["mode"] == "qlora" and len(result.losses) == 2
    with pytest.raises(ConfigError, match="already quantized"):
        Trainer(str(folder), backend="mlx", mode="lora", output_dir=str(tmp_path / "x"), **FAST).train(dataset, 1)


def test_full_fine_tuning_writes_a_model_transformers_loads(tiny_llama, dataset, tmp_path):
    from transformers import AutoModelForCausalLM

    options = dict(FAST, learning_rate=1e-3)
    trainer = Trainer("tiny-llama", backend="mlx", mode="full", output_dir=str(tmp_path / "full"), **options)
    result = trainer.train(dataset, steps=3)
    assert result.adapter_dir.name == "model" and result.losses[-1][1] < result.losses[0][1]
    model = AutoModelForCausalLM.from_pretrained(result.adapter_dir, dtype=torch.float32).eval()
    ids = np.random.default_rng(2).integers(0, 300, size=(1, 32))
    with torch.no_grad():
        want = model(torch.tensor(ids)).logits.numpy()
    net = trainer._trained.net
    net.eval()
    np.testing.assert_allclose(np.array(net(mx.array(ids))), want, atol=2e-4)


def test_cli_trains_on_mlx_and_the_adapter_exports_to_gguf(tiny_llama, tmp_path):
    """`backprop train --backend mlx` then `backprop export RUN/adapter --format gguf`: llama.cpp predicts like peft."""
    pytest.importorskip("xllamacpp")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from backpropagate.generate import GGUFModel
    from cli_helpers import run_cli

    run = tmp_path / "run"
    trained = run_cli(
        "train", "--backend", "mlx", "--model", "tiny-llama", "--data", str(EXAMPLES / "chat.jsonl"), "--steps", "3",
        "--learning-rate", "1e-2", "--output-dir", str(run), "--no-progress", "--report-to", "none",
    )  # fmt: skip
    assert trained.status == 0, trained.stderr
    assert json.loads((run / "adapter/backpropagate_run.json").read_text())["hyperparameters"]["backend"] == "mlx"
    exported = run_cli("export", str(run / "adapter"), "--format", "gguf", "--quantization", "f32")
    assert exported.status == 0, exported.stderr
    gguf_file = next((run / "adapter-gguf").glob("*.gguf"))
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, run / "adapter").eval()
    text = "What is the capital of France?"
    ids = AutoTokenizer.from_pretrained(tiny_llama)(text)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].double(), -1)
    want = torch.topk(logp, 5)
    got = GGUFModel(gguf_file, n_ctx=256).top_logprobs(text, 5)
    assert {t for t, _ in got} == set(want.indices.tolist())
    np.testing.assert_allclose([v for _, v in got], [logp[t].item() for t, _ in got], atol=1e-2)


def test_out_of_memory_halves_the_micro_batch_and_keeps_the_curve(tiny_llama, dataset, tmp_path, monkeypatch):
    real = mlx_loop.accumulate

    def two_rows_do_not_fit(tm, objective, batches, loss_and_grad):
        if len(batches) < 4:  # two packed rows per micro-batch
            raise RuntimeError("[malloc] Unable to allocate 8589934592 bytes.")  # what MLX raises
        return real(tm, objective, batches, loss_and_grad)

    monkeypatch.setattr(mlx_loop, "accumulate", two_rows_do_not_fit)
    options = dict(FAST, backend="mlx")
    halved = Trainer("tiny-llama", output_dir=str(tmp_path / "oom"), **options).train(dataset, steps=3)
    monkeypatch.setattr(mlx_loop, "accumulate", real)
    run = json.loads(halved.run_file.read_text())
    assert run["hyperparameters"]["final_micro_batch"] == 1
    options.update(micro_batch=1, grad_accumulation=4)
    plain = Trainer("tiny-llama", output_dir=str(tmp_path / "plain"), **options).train(dataset, steps=3)
    np.testing.assert_allclose([v for _, v in halved.losses], [v for _, v in plain.losses], rtol=1e-5)


def test_qwen2_and_reasoning_traces_train_on_mlx(tiny_qwen2, tmp_path):
    """Another family (tied embeddings, attention biases) through the real data engine, with trace filtering."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    trainer = Trainer(
        "tiny-qwen2", backend="mlx", reasoning_trace=True, max_seq_length=512, output_dir=str(tmp_path / "r"), **FAST
    )
    result = trainer.train(EXAMPLES / "traces.jsonl", steps=2)
    assert result.data_stats["rows_used"] > 0 and len(result.losses) == 2
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_qwen2), result.adapter_dir)
    ids = np.random.default_rng(3).integers(0, 300, size=(1, 24))
    with torch.no_grad():
        want = peft_model.eval()(torch.tensor(ids)).logits.numpy()
    net = trainer._trained.net
    net.eval()
    np.testing.assert_allclose(np.array(net(mx.array(ids))), want, atol=2e-4)
