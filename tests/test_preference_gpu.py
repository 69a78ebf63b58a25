"""CUDA paths of the preference methods (run on a GPU machine: pytest -m gpu tests/test_preference_gpu.py)."""

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.gpu  # skipped without CUDA (conftest)
CUDA = torch.device("cuda")


def test_varlen_attention_with_a_shared_prefix_equals_each_sample_alone():
    from backpropagate.backends import attention

    torch.manual_seed(0)
    # Two pairs: stored as prefix + chosen tail + rejected tail; attention order is each sample whole.
    prefix, tails = [30, 7], [(50, 41), (3, 12)]
    expand, keep, stored_len, lengths, att = [], [], 0, [], 0
    for p, (c, r) in zip(prefix, tails, strict=True):
        base = stored_len
        expand += (
            list(range(base, base + p + c)) + list(range(base, base + p)) + list(range(base + p + c, base + p + c + r))
        )
        keep += list(range(att, att + p + c)) + list(range(att + 2 * p + c, att + 2 * p + c + r))
        stored_len += p + c + r
        att += 2 * p + c + r
        lengths += [p + c, p + r]
    heads, kv_heads, dim = 8, 2, 64
    q = torch.randn(1, heads, stored_len, dim, device=CUDA, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, kv_heads, stored_len, dim, device=CUDA, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1, kv_heads, stored_len, dim, device=CUDA, dtype=torch.bfloat16, requires_grad=True)
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32, device=CUDA)
    expand_t = torch.tensor(expand, device=CUDA)
    keep_t = torch.tensor(keep, device=CUDA)
    out, _ = attention.packed_attention_forward(
        torch.nn.Module(),
        q,
        k,
        v,
        None,
        scaling=dim**-0.5,
        **attention.packed_kwargs(cu, max(lengths)),
        **attention.expand_kwargs(expand_t, keep_t),
    )
    grads = torch.autograd.grad(out.float().square().sum(), [q, k, v])
    # Reference: every sample alone through SDPA, outputs taken at the same stored tokens.
    qe, ke, ve = (t.index_select(2, expand_t) for t in (q, k, v))
    pieces = []
    for lo, hi in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        pieces.append(
            torch.nn.functional.scaled_dot_product_attention(
                qe[:, :, lo:hi], ke[:, :, lo:hi], ve[:, :, lo:hi], is_causal=True, enable_gqa=True
            ).transpose(1, 2)
        )
    ref = torch.cat(pieces, dim=1).index_select(1, keep_t)
    ref_grads = torch.autograd.grad(ref.float().square().sum(), [q, k, v])
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got.float(), want.float(), rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("mode", ["lora", "qlora"])
def test_orpo_shared_prompt_on_cuda_matches_two_sequences_and_learns(tiny_qwen2, mode, tmp_path):
    from backpropagate.backends import torch_backend
    from backpropagate.backends.attention import packed_attention
    from backpropagate.backends.loading import load_for_training
    from backpropagate.backends.losses import normalised_loss, objective_for, step_totals
    from backpropagate.backends.torch_backend import forward_hidden, policy_of
    from backpropagate.config import TrainConfig
    from backpropagate.data import DataConfig, prepare
    from backpropagate.examples import example_path

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
            terms = objective.loss_sum(forward_hidden(tm, device_batch), tm.lm_head_weight, device_batch)
            return float(normalised_loss(terms, step_totals(objective, [batch])))

    before = loss(True)
    assert before == pytest.approx(loss(False), rel=2e-2)
    config = TrainConfig(learning_rate=5e-3, micro_batch=pairs.num_rows, grad_accumulation=1, **options)
    outcome = torch_backend.train(tm, pairs, config, 3, tmp_path, "run", {})
    assert all(np.isfinite(value) for _, value in outcome.state.losses)
    assert loss(True) < before
