"""CUDA-graphed micro-batch steps: padding to a shape bucket changes nothing; graphs train as eager does."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from backpropagate.config import TrainConfig
from backpropagate.data import DataConfig, prepare
from backpropagate.examples import example_path
from backpropagate.train.torch import attention, step_graph
from backpropagate.train.torch import loop as torch_loop
from backpropagate.train.torch.attention import packed_attention
from backpropagate.train.torch.loading import load_for_training
from backpropagate.train.torch.losses import DeviceBatch, step_totals
from backpropagate.train.torch.objectives import objective_for
from backpropagate.train.torch.preference import batch_of_samples
from train_helpers import rule_dataset

QUIET = dict(progress=False, report_to="none")


def _step(tm, objective, device_batch, totals):
    tm.model.zero_grad(set_to_none=True)
    with packed_attention(tm.model):
        loss = torch_loop.forward_backward(tm, objective, device_batch, totals)
    return float(loss), {n: p.grad.clone() for n, p in tm.model.named_parameters() if p.grad is not None}


def _padded(device_batch, pad):
    shape = step_graph.shape_for(device_batch, device_batch.input_ids.shape[1] + pad)
    assert shape.holds(device_batch)
    static = step_graph.padded_batch(device_batch, shape, 256)
    step_graph.load(static, device_batch)
    return static


@pytest.mark.parametrize("pad", [0, 7])
@pytest.mark.parametrize(("method", "shared"), [("orpo", True), ("orpo", False), ("simpo", True), ("sft", False)])
def test_a_padded_batch_gives_the_loss_and_gradients_of_the_batch(tiny_qwen2, method, shared, pad):
    if method == "sft":
        dataset = rule_dataset(vocab=400, samples=12, min_len=5, max_len=30, max_seq_length=96, seed=3)
    else:
        dataset = prepare(example_path("preference"), tiny_qwen2, DataConfig(max_seq_length=256, cache=False))
    config = TrainConfig(
        method=method, mode="lora", device="cpu", lora_r=8, lora_alpha=16.0, shared_prompt=shared, **QUIET
    )
    torch.manual_seed(0)
    tm = load_for_training(tiny_qwen2, config)
    with torch.no_grad():
        for name, p in tm.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    objective = objective_for(config, dataset, torch_loop.policy_of(tm))
    batch = dataset.batch_of(np.concatenate([dataset.row_samples(r) for r in range(min(dataset.num_rows, 3))]))
    totals = torch.tensor(step_totals(objective, [batch]), dtype=torch.float32)
    device_batch = objective.device_batch(batch, tm.device)
    padded = _padded(device_batch, pad)
    assert padded.input_ids.shape[1] == device_batch.input_ids.shape[1] + pad
    assert len(padded.targets) >= len(device_batch.targets)
    assert (padded.kv_index is None) == (device_batch.kv_index is None)
    plain_loss, plain_grads = _step(tm, objective, device_batch, totals)
    padded_loss, padded_grads = _step(tm, objective, padded, totals)
    assert padded_loss == pytest.approx(plain_loss, rel=1e-5)
    assert padded_grads.keys() == plain_grads.keys() and plain_grads
    for name, grad in plain_grads.items():
        torch.testing.assert_close(padded_grads[name], grad, rtol=1e-4, atol=1e-6)


def test_a_shape_holds_smaller_batches_and_reloads_them_cleanly(tiny_qwen2):
    dataset = prepare(example_path("preference"), tiny_qwen2, DataConfig(max_seq_length=256, cache=False))
    config = TrainConfig(method="orpo", mode="lora", device="cpu", lora_r=8, lora_alpha=16.0, **QUIET)
    tm = load_for_training(tiny_qwen2, config)
    objective = objective_for(config, dataset, torch_loop.policy_of(tm))
    batches = [objective.device_batch(dataset.batch_of(dataset.row_samples(r)), tm.device) for r in range(2)]
    large, small = sorted(batches, key=lambda b: b.input_ids.shape[1], reverse=True)
    shape = step_graph.shape_for(large, large.input_ids.shape[1] + 3)
    assert shape.bounds % step_graph.SAMPLE_BUCKET == 0 and shape.targets % step_graph.BUCKET == 0
    assert not step_graph.shape_for(large, large.input_ids.shape[1] + 100).holds(large)  # more than SLACK
    static = step_graph.padded_batch(large, shape, 256)
    step_graph.load(static, large)
    if shape.holds(small):  # a smaller batch after a larger one: the larger one's tail must not leak
        step_graph.load(static, small)
        n = len(small.targets)
        assert torch.equal(static.targets[:n], small.targets)
        assert static.target_weight is not None and float(static.target_weight[n:].sum()) == 0.0
        assert int(static.cu_seqlens[len(small.cu_seqlens)]) == shape.tokens


def test_new_graphs_take_whole_rows_or_the_cheapest_token_count():
    times = {m: (0.5 if m == 56 else 1.0) for m in range(0, 200)}
    graphs = step_graph.StepGraphs(lambda b, t: t, [], 1024, timer=lambda m: times[m])
    assert graphs.token_length(33) == 56  # a cuBLAS cliff: the cheapest count wins
    assert step_graph.StepGraphs(lambda b, t: t, [], 1024).token_length(33) == 40
    assert step_graph.StepGraphs(lambda b, t: t, [], 1024).token_length(48) == 48
    rows = step_graph.StepGraphs(lambda b, t: t, [], 2048, timer=float)
    assert rows.token_length(8164) == rows.token_length(8192) == 8192  # four nearly full packed rows
    assert rows.token_length(6499) == 6504  # far from whole rows: timed
    assert step_graph.slack(8192) == 256 and step_graph.slack(100) == step_graph.SLACK


def _sft_batch(lengths):
    ids = [np.arange(1, n + 1) for n in lengths]
    return DeviceBatch.from_batch(batch_of_samples(ids, ids), torch.device("cpu"))


def test_a_graph_of_equal_rows_holds_only_batches_of_those_rows():
    """Samples of one length that fill the row run attention as a batch: a graph captured so serves no other."""
    equal, unequal, fewer = _sft_batch([64] * 4), _sft_batch([60, 68, 64, 64]), _sft_batch([64] * 3)
    assert (equal.equal_rows, unequal.equal_rows, fewer.equal_rows) == (4, 0, 3)
    rows_shape = step_graph.shape_for(equal, 256)
    assert rows_shape.rows == 4 and rows_shape.holds(equal)
    assert not rows_shape.holds(unequal)  # same tokens, other boundaries
    assert not rows_shape.holds(fewer)  # would need padding, which is not a sample of the batch
    static = step_graph.padded_batch(equal, rows_shape, 64)
    assert static.equal_rows == 4 and static.attention_kwargs()[attention.EQUAL_ROWS] == 4
    general = step_graph.shape_for(unequal, 256)
    assert general.rows == 0 and general.holds(equal) and general.holds(unequal)
    padded = step_graph.shape_for(equal, 264)
    assert padded.rows == 0 and step_graph.padded_batch(equal, padded, 64).equal_rows == 0
    assert attention.EQUAL_ROWS not in step_graph.padded_batch(equal, padded, 64).attention_kwargs()


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("method", "mode", "length"), [("orpo", "qlora", 0), ("orpo", "lora", 0), ("sft", "qlora", 0), ("sft", "lora", 128)]
)
def test_cuda_graphs_train_like_eager_steps(tiny_qwen2, method, mode, length, tmp_path, monkeypatch):
    """`length`: every sample that long, a row each, so micro-batches are equal rows (cuDNN attention on Hopper)."""
    if length:
        dataset = rule_dataset(vocab=400, samples=64, min_len=length, max_len=length, max_seq_length=length, seed=1)
    elif method == "sft":
        dataset = rule_dataset(vocab=400, samples=64, min_len=5, max_len=60, max_seq_length=128, seed=1)
    else:
        dataset = prepare(example_path("preference"), tiny_qwen2, DataConfig(max_seq_length=256, cache=False))
    curves, replays, made = {}, {}, []
    original = torch_loop.step_graphs
    monkeypatch.setattr(torch_loop, "step_graphs", lambda *a: made.append(original(*a)) or made[-1])
    for graphs in (False, True):
        config = TrainConfig(
            method=method,
            mode=mode,
            device="cuda",
            lora_r=8,
            lora_alpha=16.0,
            learning_rate=2e-3,
            micro_batch=2,
            grad_accumulation=2,
            warmup_steps=0,
            cuda_graphs=graphs,
            **QUIET,
        )
        torch.manual_seed(0)
        tm = load_for_training(tiny_qwen2, config)
        outcome = torch_loop.train(tm, dataset, config, 8, tmp_path / str(graphs), "run", {})
        curves[graphs] = [loss for _, loss in outcome.state.losses]
        replays[graphs] = made[-1].replays if made[-1] is not None else 0
    assert replays[False] == 0 and replays[True] > 0
    if length:
        assert [entry.shape.rows for entry in made[-1].entries] == [2]
        assert ("cudnn_attention" in tm.features) == (torch.cuda.get_device_capability() >= (9, 0))
    np.testing.assert_allclose(curves[True], curves[False], rtol=2e-2)
    assert curves[True][-1] < curves[True][0]
