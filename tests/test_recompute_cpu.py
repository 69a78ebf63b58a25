"""`gradient_checkpointing=auto` on the CPU: activations are kept where the available RAM holds them."""

import pytest
import torch

from backpropagate import Trainer
from backpropagate.train.torch import recompute
from train_helpers import rule_dataset

OPTIONS = dict(
    progress=False, report_to="none", precision="fp32", micro_batch=2, grad_accumulation=1, learning_rate=1e-3
)


@pytest.fixture(scope="module")
def dataset():
    return rule_dataset(vocab=300, samples=40, max_seq_length=96, seed=2)


def test_available_ram_reads_meminfo(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemFree:         1000 kB\nMemAvailable:   16000000 kB\n")
    assert recompute.available_ram(meminfo) == 16_000_000 * 1024
    assert recompute.available_ram() is not None  # this machine's own


def test_auto_keeps_every_layer_when_ram_allows(tiny_llama, dataset, tmp_path):
    result = Trainer("tiny-llama", output_dir=str(tmp_path / "run"), **OPTIONS).train(dataset, steps=2)
    assert "recompute[0/2]" in result.features


@pytest.mark.parametrize(("layers_of_ram", "recomputed"), [(0.5, 2), (1.5, 1)])
def test_auto_recomputes_what_ram_cannot_hold(tiny_llama, dataset, tmp_path, monkeypatch, layers_of_ram, recomputed):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_llama)
    per_layer = recompute.activation_bytes_per_token(config, torch.float32) * OPTIONS["micro_batch"] * 96
    monkeypatch.setattr(recompute, "available_ram", lambda: layers_of_ram * per_layer / recompute.RAM_TARGET)
    result = Trainer("tiny-llama", output_dir=str(tmp_path / "run"), **OPTIONS).train(dataset, steps=2)
    assert f"recompute[{recomputed}/2]" in result.features


def test_unknown_ram_recomputes_every_layer(tiny_llama, dataset, tmp_path, monkeypatch):
    monkeypatch.setattr(recompute, "available_ram", lambda: None)
    result = Trainer("tiny-llama", output_dir=str(tmp_path / "run"), **OPTIONS).train(dataset, steps=2)
    assert "recompute[2/2]" in result.features


def test_auto_sets_aside_a_kept_layer_s_whole_mlp_backward(tiny_llama, dataset, tmp_path, monkeypatch):
    """Beyond a slice's length a kept layer's MLP backward holds its whole gradients: RAM for 2.1 layers keeps one."""
    from transformers import AutoConfig

    from backpropagate.memory_estimate import whole_mlp_backward_excess
    from backpropagate.train.torch import chunked_mlp

    config = AutoConfig.from_pretrained(tiny_llama)
    tokens = OPTIONS["micro_batch"] * 96
    per_layer = recompute.activation_bytes_per_token(config, torch.float32) * tokens
    monkeypatch.setattr(recompute, "available_ram", lambda: 2.1 * per_layer / recompute.RAM_TARGET)
    monkeypatch.setattr(chunked_mlp, "CHUNK_TOKENS", 50)
    assert 0.1 * per_layer < whole_mlp_backward_excess(config, tokens, torch.float32) < per_layer
    result = Trainer("tiny-llama", output_dir=str(tmp_path / "run"), **OPTIONS).train(dataset, steps=2)
    assert "recompute[1/2]" in result.features
