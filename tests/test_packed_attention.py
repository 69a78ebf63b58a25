"""Packed rows train exactly like the samples run one by one (no attention across samples)."""

import numpy as np
import pytest
import torch

from backpropagate.train.torch import attention
from backpropagate.train.torch.attention import block_causal_mask, packed_attention
from backpropagate.train.torch.loading import TrainingModel
from backpropagate.train.torch.loop import forward_hidden
from backpropagate.train.torch.losses import DeviceBatch, target_logprobs
from train_helpers import rule_dataset


def _model(path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    return TrainingModel(model, torch.device("cpu"), "full", torch.float32, False, 0)


def _alone_losses(tm, dataset, samples):
    """Per-sample mean NLL, each sample alone through the plain transformers forward and its loss."""
    out = []
    for s in samples:
        lo, hi = dataset.sample_offsets[s], dataset.sample_offsets[s + 1]
        ids = torch.from_numpy(dataset.input_ids[lo:hi].astype(np.int64))[None]
        labels = torch.from_numpy(dataset.labels[lo:hi].astype(np.int64))[None]
        labels[0, 0] = -100
        out.append(float(tm.model(input_ids=ids, labels=labels).loss))
    return out


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_qwen2"])
def test_packed_per_sample_losses_equal_samples_alone(name, request):
    tm = _model(request.getfixturevalue(name))
    dataset = rule_dataset(vocab=400, samples=12, min_len=5, max_len=30, max_seq_length=96, seed=3)
    samples = dataset.row_samples(0)
    assert len(samples) >= 3
    batch = DeviceBatch.from_batch(dataset.batch_of(samples), torch.device("cpu"))
    with torch.no_grad(), packed_attention(tm.model):
        hidden = forward_hidden(tm, batch)
        logp = target_logprobs(hidden, tm.lm_head, batch)
    packed = [float(-logp[batch.target_sample == i].mean()) for i in range(batch.num_samples)]
    with torch.no_grad():
        alone = _alone_losses(tm, dataset, samples)
    np.testing.assert_allclose(packed, alone, rtol=1e-5, atol=1e-5)
    # The same row without sample boundaries attends across samples and gives other losses.
    with torch.no_grad():
        crossing = tm.model.model(input_ids=batch.input_ids, position_ids=batch.position_ids).last_hidden_state
        leaky = target_logprobs(crossing, tm.lm_head, batch)
    assert not torch.allclose(leaky, logp, atol=1e-3)


def test_packed_gradients_equal_summed_sample_gradients(tiny_llama):
    tm = _model(tiny_llama)
    dataset = rule_dataset(vocab=400, samples=8, min_len=5, max_len=20, max_seq_length=64, seed=5)
    samples = dataset.row_samples(0)
    batch = DeviceBatch.from_batch(dataset.batch_of(samples), torch.device("cpu"))
    with packed_attention(tm.model):
        (-target_logprobs(forward_hidden(tm, batch), tm.lm_head, batch).sum()).backward()
    packed = {n: p.grad.clone() for n, p in tm.model.named_parameters()}
    tm.model.zero_grad()
    for s in samples:
        lo, hi = dataset.sample_offsets[s], dataset.sample_offsets[s + 1]
        ids = torch.from_numpy(dataset.input_ids[lo:hi].astype(np.int64))[None]
        labels = torch.from_numpy(dataset.labels[lo:hi].astype(np.int64))[None]
        labels[0, 0] = -100
        n = int((labels[0, 1:] != -100).sum())
        (tm.model(input_ids=ids, labels=labels).loss * n).backward()
    for name, grad in packed.items():
        torch.testing.assert_close(grad, tm.model.get_parameter(name).grad, rtol=1e-4, atol=1e-5)


def test_block_causal_mask():
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    mask = block_causal_mask(cu, cu, 5, 5, None, torch.device("cpu"))
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [0, 0, 1, 0, 0],
            [0, 0, 1, 1, 0],
            [0, 0, 1, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(mask, expected)
    windowed = block_causal_mask(cu, cu, 5, 5, 2, torch.device("cpu"))
    assert not windowed[4, 2] and windowed[4, 3] and windowed[4, 4]
    # Query segments shorter than their keys hold the segment's last tokens (diagonal at bottom right).
    short = block_causal_mask(cu, torch.tensor([0, 3, 7], dtype=torch.int32), 5, 7, None, torch.device("cpu"))
    assert short[0].tolist() == [1, 1, 0, 0, 0, 0, 0] and short[1].tolist() == [1, 1, 1, 0, 0, 0, 0]
    assert short[2].tolist() == [0, 0, 0, 1, 1, 0, 0] and short[4].tolist() == [0, 0, 0, 1, 1, 1, 1]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_shared_prefix_attention_equals_each_sample_alone(device):
    """Queries in stored order (a pair's prefix once), keys gathered per sample: each sample as if alone."""
    torch.manual_seed(0)
    dev = torch.device(device)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    # Two pairs stored as prefix + chosen tail + rejected tail.
    prefix, tails = [30, 7], [(50, 41), (3, 12)]
    kv_index, len_q, len_k, stored = [], [], [], 0
    for p, (c, r) in zip(prefix, tails, strict=True):
        kv_index += list(range(stored, stored + p + c)) + list(range(stored, stored + p))
        kv_index += list(range(stored + p + c, stored + p + c + r))
        len_q += [p + c, r]
        len_k += [p + c, p + r]
        stored += p + c + r
    heads, kv_heads, dim = 8, 2, 64
    q, k, v = (
        torch.randn(1, h, stored, dim, device=dev, dtype=dtype, requires_grad=True) for h in (heads, kv_heads, kv_heads)
    )
    cu_q, cu_k = (
        torch.tensor(np.concatenate([[0], np.cumsum(n)]), dtype=torch.int32, device=dev) for n in (len_q, len_k)
    )
    index = torch.tensor(kv_index, device=dev)
    kwargs = attention.packed_kwargs(cu_q, max(len_q), cu_k, max(len_k), index)
    out, _ = attention.packed_attention_forward(torch.nn.Module(), q, k, v, None, scaling=dim**-0.5, **kwargs)
    grads = torch.autograd.grad(out.float().square().sum(), [q, k, v])
    # Reference: each sample whole through SDPA; its stored tokens' outputs are its last len_q outputs.
    ke, ve = k.index_select(2, index), v.index_select(2, index)
    pieces = []
    for i in range(len(len_q)):
        klo, khi, qlo, qhi = int(cu_k[i]), int(cu_k[i + 1]), int(cu_q[i]), int(cu_q[i + 1])
        prefix_q = ke.new_zeros(1, heads, (khi - klo) - (qhi - qlo), dim)  # rows whose outputs are dropped
        whole_q = torch.cat([prefix_q, q[:, :, qlo:qhi]], dim=2)
        att = torch.nn.functional.scaled_dot_product_attention(
            whole_q, ke[:, :, klo:khi], ve[:, :, klo:khi], is_causal=True, enable_gqa=True
        )
        pieces.append(att[:, :, (khi - klo) - (qhi - qlo) :].transpose(1, 2))
    ref = torch.cat(pieces, dim=1)
    ref_grads = torch.autograd.grad(ref.float().square().sum(), [q, k, v])
    tol = dict(rtol=2e-2, atol=2e-2) if device == "cuda" else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.float(), ref.float(), **tol)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got.float(), want.float(), **{k: 2.5 * t for k, t in tol.items()})


def test_cpu_per_sample_attention_equals_the_block_diagonal_mask():
    torch.manual_seed(0)
    cu = torch.tensor([0, 7, 8, 20, 33], dtype=torch.int32)
    q = torch.randn(1, 6, 33, 16, requires_grad=True)
    k = torch.randn(1, 2, 33, 16, requires_grad=True)  # grouped-query keys and values
    v = torch.randn(1, 2, 33, 16, requires_grad=True)
    grad = torch.randn(1, 33, 6, 16)
    per_sample = attention._sdpa_per_sample(q, k, v, cu, 0.3)
    (per_sample * grad).sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    masked = attention._sdpa_block_causal(q, k, v, cu, cu, 0.3, None)
    (masked * grad).sum().backward()
    torch.testing.assert_close(per_sample, masked)
    for got, want in zip(grads, (q.grad, k.grad, v.grad), strict=True):
        torch.testing.assert_close(got, want)
    halves = [t.detach().bfloat16().requires_grad_() for t in (q, k, v)]
    in_bf16 = attention._sdpa_per_sample(*halves, cu, 0.3)
    (in_bf16 * grad.bfloat16()).sum().backward()
    assert in_bf16.dtype == torch.bfloat16 and all(t.grad.dtype == torch.bfloat16 for t in halves)
    torch.testing.assert_close(in_bf16.float(), masked, atol=0.05, rtol=0.02)
    for got, want in zip(halves, (q.grad, k.grad, v.grad), strict=True):
        torch.testing.assert_close(got.grad.float(), want, atol=0.1, rtol=0.05)


def test_a_flex_attention_that_fails_to_compile_stops_the_run(monkeypatch):
    """After a failed compile torch would run flex uncompiled, saving other tensors than the
    forward did: the failure is a coded error, and so is every later call in the process."""
    from backpropagate.errors import RunFailedError

    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("unbacked_bindings")

    monkeypatch.setattr(attention, "_compiled_flex", failing)
    monkeypatch.setattr(attention, "_flex_failure", None)
    q, k, v = (torch.randn(1, 2, 8, 16) for _ in range(3))
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    for _ in range(2):
        with pytest.raises(RunFailedError) as err:
            attention._flex(q, k, v, cu, cu, None, 4)
        assert err.value.code == "RUNTIME_KERNEL_COMPILE_FAILED" and "unbacked_bindings" in str(err.value)
    assert len(calls) == 1


def test_cudnn_attention_is_tried_only_for_half_precision_on_cuda_cards():
    """Elsewhere the check runs nothing and verifies nothing: every row keeps the kernels above."""
    import types

    from transformers import Qwen2Config

    from backpropagate.train.torch import cudnn_attention

    model = types.SimpleNamespace(config=Qwen2Config(num_attention_heads=4, num_key_value_heads=1, hidden_size=512))
    assert not cudnn_attention.check(model, torch.device("cpu"), torch.bfloat16)
    assert not cudnn_attention.verified(torch.zeros(1, 4, 8, 128), torch.zeros(1, 1, 8, 128))


def test_rows_of_equal_samples_are_counted_only_where_they_fill_the_row():
    count = attention.count_equal_rows
    assert count(np.array([0, 2048, 4096, 6144, 8192]), 8192) == 4
    assert count(np.array([0, 500]), 500) == 1  # one sample: a long-context row
    assert count(np.array([0, 2048, 4000, 6144, 8192]), 8192) == 0  # unequal
    assert count(np.array([0, 2048, 4096]), 4100) == 0  # tokens past the last sample
    assert count(np.array([0]), 0) == 0
    cu = torch.tensor([0, 4, 8], dtype=torch.int32)
    assert attention.packed_kwargs(cu, 4, equal_rows=2)[attention.EQUAL_ROWS] == 2
    assert attention.EQUAL_ROWS not in attention.packed_kwargs(cu, 4, kv_index=torch.arange(8), equal_rows=2)
    assert attention.EQUAL_ROWS not in attention.packed_kwargs(cu, 4)


@pytest.mark.parametrize("model_layout", [True, False])
@pytest.mark.parametrize("rows", [1, 3])
def test_equal_samples_attended_as_a_batch_equal_each_sample_alone(rows, model_layout):
    """`cudnn_attention.attend`'s view of a packed row as a batch (SDPA's math backend here; cuDNN on the card)."""
    from torch.nn.attention import SDPBackend

    from backpropagate.train.torch import cudnn_attention

    torch.manual_seed(0)
    length, heads, kv_heads, dim = 7, 4, 2, 16

    def leaf(n: int) -> torch.Tensor:
        if model_layout:  # [1, T, heads, dim] seen as [1, heads, T, dim], as projections leave it
            return torch.randn(1, rows * length, n, dim).transpose(1, 2).requires_grad_()
        return torch.randn(1, n, rows * length, dim, requires_grad=True)

    q, k, v = leaf(heads), leaf(kv_heads), leaf(kv_heads)
    grad = torch.randn(1, rows * length, heads, dim)
    cu = torch.arange(0, rows * length + 1, length, dtype=torch.int32)
    batched = cudnn_attention.attend(q, k, v, 0.3, rows, backend=SDPBackend.MATH)
    alone = attention._sdpa_per_sample(q, k, v, cu, 0.3)
    assert batched.shape == alone.shape == (1, rows * length, heads, dim)
    torch.testing.assert_close(batched, alone)
    got = torch.autograd.grad(batched, (q, k, v), grad)
    want = torch.autograd.grad(alone, (q, k, v), grad)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


def test_equal_rows_view_has_no_selection_in_its_backward():
    """The batch view's backward is views only: a selection's would write each gradient into a zero tensor and copy it."""
    from torch.nn.attention import SDPBackend

    from backpropagate.train.torch import cudnn_attention

    q, k, v = (torch.randn(1, 12, n, 8).transpose(1, 2).requires_grad_() for n in (4, 2, 2))
    out = cudnn_attention.attend(q, k, v, None, rows=3, backend=SDPBackend.MATH)
    seen, stack = set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(fn for fn, _ in node.next_functions)
    assert not {type(node).__name__ for node in seen if type(node).__name__.startswith("SelectBackward")}
