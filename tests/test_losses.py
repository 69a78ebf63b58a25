import numpy as np
import pytest
import torch

from backpropagate.train.torch.losses import DeviceBatch, LMHead, chunk_length, sequence_logprobs, token_logprobs
from train_helpers import rule_dataset


def _reference(hidden, weight, targets):
    return torch.log_softmax(hidden @ weight.t(), dim=-1).gather(1, targets[:, None]).squeeze(1)


@pytest.mark.parametrize("head_trains", [False, True])
@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_chunked_token_logprobs_match_full_logits(head_trains, chunk):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(29, 16, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, generator=g, requires_grad=head_trains)
    targets = torch.randint(0, 50, (29,), generator=g)
    upstream = torch.randn(29, dtype=torch.float64, generator=g)
    ref = _reference(hidden, weight, targets)
    ref_grads = torch.autograd.grad((ref * upstream).sum(), [hidden, weight] if head_trains else [hidden])
    out = token_logprobs(hidden, weight, targets, chunk=chunk)
    grads = torch.autograd.grad((out.double() * upstream).sum(), [hidden, weight] if head_trains else [hidden])
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-6)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_chunk_length_bounds_logits_memory():
    assert chunk_length(152064) * 152064 * 4 <= 512 * 2**20
    assert chunk_length(100) >= 64


def test_sequence_logprobs_sum_per_sample():
    dataset = rule_dataset(vocab=50, samples=6, min_len=4, max_len=9, max_seq_length=40)
    samples = dataset.row_samples(0)
    batch = DeviceBatch.from_batch(dataset.batch_of(samples), torch.device("cpu"))
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(1, batch.input_ids.shape[1], 8, generator=g)
    weight = torch.randn(50, 8, generator=g)
    sums, counts = sequence_logprobs(hidden, LMHead(weight), batch)
    labels = batch.batch.labels[0]
    cu = batch.batch.cu_seqlens
    for i in range(len(samples)):
        lo, hi = int(cu[i]), int(cu[i + 1])
        pos = [t for t in range(lo, hi - 1) if labels[t + 1] != -100]
        tgt = torch.tensor(labels[np.array(pos) + 1], dtype=torch.long)
        want = _reference(hidden[0, pos].double(), weight.double(), tgt).sum()
        assert counts[i] == len(pos)
        torch.testing.assert_close(sums[i].double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eager_logprob_kernel_computes_what_the_compiled_one_does(dtype):
    """The CPU's in-place log-softmax form against the plain form CUDA compiles."""
    from backpropagate.train.torch import losses

    g = torch.Generator().manual_seed(0)
    logits = (4 * torch.randn(37, 500, generator=g)).to(dtype)
    targets = torch.randint(0, 500, (37,), generator=g)
    kept = logits.clone()
    logp, grad = losses._logprob_and_grad_eager(logits, targets)
    want_logp, want_grad = losses._logprob_and_grad(logits, targets)
    assert torch.equal(logits, kept) and grad.dtype == dtype
    torch.testing.assert_close(logp, want_logp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        grad.float(), want_grad.float(), rtol=1e-2, atol=1e-3 if dtype == torch.bfloat16 else 1e-6
    )
