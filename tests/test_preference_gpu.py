"""CUDA paths of the preference methods (run on a GPU machine: pytest -m gpu tests/test_preference_gpu.py)."""

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.gpu  # skipped without CUDA (conftest)
CUDA = torch.device("cuda")


@pytest.mark.parametrize("mode", ["lora", "qlora"])
def test_orpo_shared_prompt_on_cuda_matches_two_sequences_and_learns(tiny_qwen2, mode, tmp_path):
    from backpropagate.config import TrainConfig
    from backpropagate.data import DataConfig, prepare
    from backpropagate.examples import example_path
    from backpropagate.train.torch import loop as torch_loop
    from backpropagate.train.torch.attention import packed_attention
    from backpropagate.train.torch.loading import load_for_training
    from backpropagate.train.torch.loop import forward_hidden, policy_of
    from backpropagate.train.torch.losses import normalised_loss, step_totals
    from backpropagate.train.torch.objectives import objective_for

    pairs = prepare(example_path("preference"), tiny_qwen2, DataConfig(max_seq_length=256, cache=False))
    options = dict(method="orpo", mode=mode, device="cuda", lora_r=8, lora_alpha=16.0, progress=False, report_to="none")
    torch.manual_seed(0)
    tm = load_for_training(tiny_qwen2, TrainConfig(**options))
    batch = pairs.batch_of(np.arange(pairs.num_samples))

    def loss(shared: bool) -> float:
        config = TrainConfig(shared_prompt=shared, **options)
        objective = objective_for(config, pairs, policy_of(tm))
        device_batch = objective.device_batch(batch, tm.device)
        with torch.no_grad(), packed_attention(tm.model):
            terms = objective.loss_sum(forward_hidden(tm, device_batch), tm.lm_head, device_batch)
            return float(normalised_loss(terms, step_totals(objective, [batch])))

    before = loss(True)
    assert before == pytest.approx(loss(False), rel=2e-2)
    config = TrainConfig(learning_rate=5e-3, micro_batch=pairs.num_rows, grad_accumulation=1, **options)
    outcome = torch_loop.train(tm, pairs, config, 3, tmp_path, "run", {})
    assert all(np.isfinite(value) for _, value in outcome.state.losses)
    assert loss(True) < before
