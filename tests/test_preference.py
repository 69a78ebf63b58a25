"""Preference methods through the layouts, the loop, the API and the CLI, on CPU."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from backpropagate import Trainer
from backpropagate.config import METHOD_LEARNING_RATES, TrainConfig
from backpropagate.data import IGNORE_INDEX, DataConfig, prepare
from backpropagate.data.dataset import Batch
from backpropagate.errors import ConfigError, InputError
from backpropagate.examples import example_path
from backpropagate.train.torch import loop as torch_loop
from backpropagate.train.torch.attention import packed_attention
from backpropagate.train.torch.loading import load_for_training
from backpropagate.train.torch.loop import forward_hidden, policy_of
from backpropagate.train.torch.losses import normalised_loss, sequence_logprobs, step_totals
from backpropagate.train.torch.objectives import objective_for
from backpropagate.train.torch.preference import (
    PairObjective,
    kto_labels,
    kto_weights,
    log1mexp,
    mismatched_batch,
    pair_layout,
    pairs_of,
    split_prompt,
)
from cli_helpers import run_cli

QUIET = dict(progress=False, report_to="none")
LORA = dict(lora_r=8, lora_alpha=16.0, device="cpu", mode="lora", precision="fp32", **QUIET)


def pair_batch(pairs: list[tuple[list[int], list[int], int]]) -> tuple[Batch, np.ndarray, np.ndarray]:
    """A batch of (chosen ids, rejected ids, prompt length) pairs, samples interleaved rejected-first."""
    ids, labels, order = [], [], []
    for c, r, p in pairs:
        for seq in (r, c):
            ids.append(np.array(seq))
            labels.append(np.array([IGNORE_INDEX] * p + seq[p:]))
    cu = np.concatenate([[0], np.cumsum([len(x) for x in ids])]).astype(np.int32)
    batch = Batch(
        input_ids=np.concatenate(ids)[None, :],
        labels=np.concatenate(labels)[None, :],
        position_ids=np.concatenate([np.arange(len(x)) for x in ids])[None, :],
        cu_seqlens=cu,
        max_seqlen=max(len(x) for x in ids),
        sample_index=np.arange(len(ids)),
        num_loss_tokens=0,
    )
    order = np.arange(len(pairs))
    return batch, 2 * order + 1, 2 * order


sequences = st.lists(st.integers(0, 3), min_size=1, max_size=12)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(sequences, sequences), min_size=1, max_size=5), st.booleans())
def test_pair_layout_gives_each_sample_its_whole_keys_and_its_own_queries(raw, share):
    pairs = [(c, r, 0) for c, r in raw]
    batch, chosen, rejected = pair_batch(pairs)
    layout = pair_layout(batch, chosen, rejected, share)
    ids = batch.input_ids[0]
    # Keys: chosen then rejected of each pair, each whole, positions from 0.
    keys = layout.input_ids[layout.kv_index]
    key_positions = layout.position_ids[layout.kv_index]
    for k, (c, r) in enumerate(zip(chosen, rejected, strict=True)):
        for j, s in enumerate((c, r)):
            lo, hi = layout.cu_k[2 * k + j], layout.cu_k[2 * k + j + 1]
            span = slice(batch.cu_seqlens[s], batch.cu_seqlens[s + 1])
            assert keys[lo:hi].tolist() == ids[span].tolist()
            assert key_positions[lo:hi].tolist() == list(range(hi - lo))
            # Queries: the sample's last tokens, stored once, at the end of its key segment.
            qlo, qhi = layout.cu_q[2 * k + j], layout.cu_q[2 * k + j + 1]
            assert 1 <= qhi - qlo <= hi - lo
            assert layout.input_ids[qlo:qhi].tolist() == ids[span][(hi - lo) - (qhi - qlo) :].tolist()
            assert layout.position_ids[qlo:qhi].tolist() == list(range((hi - lo) - (qhi - qlo), hi - lo))
    # Every original token is stored with its own id and position.
    assert np.array_equal(layout.input_ids[layout.stored], ids)
    assert np.array_equal(layout.position_ids[layout.stored], batch.position_ids[0])
    assert layout.cu_q[-1] == len(layout.input_ids) == len(ids) - layout.shared
    assert layout.max_q == max(np.diff(layout.cu_q)) and layout.max_k == max(np.diff(layout.cu_k))
    if not share:
        assert layout.shared == 0 and np.array_equal(layout.cu_q, layout.cu_k)


def test_pair_layout_shares_the_common_prompt_only_once():
    batch, chosen, rejected = pair_batch([([1, 2, 3, 4, 5], [1, 2, 3, 9], 2), ([7, 7], [7, 7], 1)])
    layout = pair_layout(batch, chosen, rejected)
    # First pair shares [1, 2, 3]; identical samples keep one token each of their own.
    assert layout.shared == 3 + 1
    assert layout.input_ids.tolist() == [1, 2, 3, 4, 5, 9, 7, 7, 7]
    assert layout.position_ids.tolist() == [0, 1, 2, 3, 4, 3, 0, 1, 1]


def test_mismatched_kl_rows_pair_each_prompt_with_the_previous_answer():
    batch, _, _ = pair_batch([([1, 2, 3], [1, 2, 4, 4], 2), ([5, 6, 7], [5, 8], 1)])
    parts = split_prompt(batch)
    kl = mismatched_batch(batch)
    got = [kl.input_ids[0][kl.cu_seqlens[i] : kl.cu_seqlens[i + 1]].tolist() for i in range(4)]
    assert got == [p.tolist() + parts[i - 1][1].tolist() for i, (p, _, _) in enumerate(parts)]
    labels = [kl.labels[0][kl.cu_seqlens[i] : kl.cu_seqlens[i + 1]] for i in range(4)]
    assert [int((x != IGNORE_INDEX).sum()) for x in labels] == [len(parts[i - 1][1]) for i in range(4)]


def test_log1mexp_is_accurate_on_both_branches():
    import mpmath  # ships with torch (through sympy)

    mpmath.mp.dps = 50
    points = [-1e-6, -0.1, -0.69, -0.7, -5.0, -40.0]
    exact = torch.tensor([float(mpmath.log(1 - mpmath.exp(x))) for x in points], dtype=torch.float64)
    torch.testing.assert_close(log1mexp(torch.tensor(points, dtype=torch.float64)), exact, rtol=1e-12, atol=0)


def test_kto_weights_balance_the_classes():
    labels = np.array([1] * 30 + [0] * 10)
    d, u = kto_weights(labels, None, None)
    assert d * 30 == pytest.approx(u * 10) and (d * 30 + u * 10) / 40 == pytest.approx(1.0)
    assert kto_weights(labels, None, 2.0) == (pytest.approx(2.0 * 10 / 30), 2.0)
    assert kto_weights(labels, 1.0, None) == (1.0, pytest.approx(3.0))
    assert kto_weights(labels, 0.5, 1.0) == (0.5, 1.0)
    assert kto_weights(np.array([1, 1]), None, None) == (1.0, 1.0)


@pytest.fixture(scope="module")
def pairs(tiny_qwen2):
    return prepare(example_path("preference"), tiny_qwen2, DataConfig(max_seq_length=256, cache=False))


def loss_and_grads(tm, config, dataset, batch):
    objective = objective_for(config, dataset, policy_of(tm))
    tm.model.zero_grad()
    device_batch = objective.device_batch(batch, tm.device)
    with packed_attention(tm.model):
        hidden = forward_hidden(tm, device_batch)
        loss = normalised_loss(objective.loss_sum(hidden, tm.lm_head, device_batch), step_totals(objective, [batch]))
        loss.backward()  # inside: checkpointed layers recompute with packed attention
    return float(loss), {n: p.grad.clone() for n, p in tm.model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("method", ["orpo", "simpo"])
def test_shared_prompt_gives_the_loss_and_gradients_of_two_sequences(tiny_qwen2, pairs, method):
    batch = pairs.batch_of(np.concatenate([pairs.row_samples(r) for r in range(pairs.num_rows)]))
    torch.manual_seed(0)
    tm = load_for_training(tiny_qwen2, TrainConfig(method=method, **LORA))
    with torch.no_grad():
        for name, p in tm.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    shared = loss_and_grads(tm, TrainConfig(method=method, **LORA), pairs, batch)
    apart = loss_and_grads(tm, TrainConfig(method=method, shared_prompt=False, **LORA), pairs, batch)
    assert shared[0] == pytest.approx(apart[0], rel=1e-5)
    assert shared[1].keys() == apart[1].keys() and shared[1]
    for name, grad in shared[1].items():
        torch.testing.assert_close(grad, apart[1][name], rtol=1e-4, atol=1e-6)


def pair_stats(tm, config, dataset):
    """(mean log-odds, mean length-normalised margin) of all pairs under the current weights."""
    objective = objective_for(config, dataset, policy_of(tm))
    assert isinstance(objective, PairObjective)
    batch = dataset.batch_of(np.arange(dataset.num_samples))
    with torch.no_grad(), packed_attention(tm.model):
        device_batch = objective.device_batch(batch, tm.device)
        mean_c, mean_r, _ = objective.pair_logps(forward_hidden(tm, device_batch), tm.lm_head, device_batch)
    log_odds = (mean_c - mean_r) - (log1mexp(mean_c) - log1mexp(mean_r))
    return float(log_odds.mean()), float((mean_c - mean_r).mean())


@pytest.mark.parametrize("method", ["orpo", "simpo"])
def test_one_step_moves_the_log_odds_towards_chosen(tiny_qwen2, pairs, method, tmp_path):
    config = TrainConfig(
        method=method, learning_rate=5e-3, micro_batch=pairs.num_rows, grad_accumulation=1, warmup_steps=0, **LORA
    )
    torch.manual_seed(0)
    tm = load_for_training(tiny_qwen2, config)
    before = pair_stats(tm, config, pairs)
    torch_loop.train(tm, pairs, config, 1, tmp_path, "run", {})
    after = pair_stats(tm, config, pairs)
    assert after[0] > before[0] and after[1] > before[1], (before, after)


def test_one_kto_step_raises_desirable_rewards_and_lowers_undesirable(tiny_llama, tmp_path):
    dataset = prepare(example_path("kto"), tiny_llama, DataConfig(max_seq_length=256, cache=False))
    config = TrainConfig(
        method="kto", learning_rate=5e-3, micro_batch=dataset.num_rows, grad_accumulation=1, warmup_steps=0, **LORA
    )
    torch.manual_seed(0)
    tm = load_for_training(tiny_llama, config)
    torch_loop.train(tm, dataset, config, 1, tmp_path, "run", {})
    batch = torch_loop.DeviceBatch.from_batch(dataset.batch_of(np.arange(dataset.num_samples)), tm.device)
    with torch.no_grad(), packed_attention(tm.model):
        policy = sequence_logprobs(forward_hidden(tm, batch), tm.lm_head, batch)[0]
        with tm.model.disable_adapter():
            reference = sequence_logprobs(forward_hidden(tm, batch), tm.lm_head, batch)[0]
    reward = (policy - reference).numpy()
    labels = kto_labels(dataset)
    assert reward[labels == 1].mean() > 0 > reward[labels == 0].mean()


@pytest.mark.parametrize(("method", "data"), [("orpo", "preference"), ("simpo", "preference"), ("kto", "kto")])
def test_api_trains_each_method_on_the_example_file(tiny_qwen2, method, data, tmp_path):
    trainer = Trainer("tiny-qwen2", method=method, output_dir=str(tmp_path / "run"), grad_accumulation=1, **QUIET)
    assert trainer.config.learning_rate == METHOD_LEARNING_RATES[method]
    result = trainer.train(example_path(data), steps=2)
    assert result.steps == 2 and all(np.isfinite(loss) for _, loss in result.losses)
    assert (result.adapter_dir / "adapter_model.safetensors").exists()
    run = json.loads(result.run_file.read_text())
    assert run["method"] == method and run["mode"] == "lora"
    assert result.data_stats["kind"] == ("kto" if data == "kto" else "preference")


def test_cli_trains_orpo_and_kto_on_the_example_files(tiny_llama, tmp_path):
    out = tmp_path / "orpo"
    res = run_cli(
        "train", "--method", "orpo", "--orpo-beta", "0.2", "--data", str(example_path("preference")),
        "--steps", "2", "--grad-accumulation", "1", "--output", str(out), "--no-progress", "--report-to", "none",
        "--json",
    )  # fmt: skip
    assert res.status == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["steps"] == 2 and np.isfinite(summary["final_loss"])
    run = json.loads((out / "adapter" / "backpropagate_run.json").read_text())
    assert run["method"] == "orpo" and run["hyperparameters"]["orpo_beta"] == 0.2
    assert run["hyperparameters"]["learning_rate"] == METHOD_LEARNING_RATES["orpo"]
    res = run_cli(
        "train", "--method", "kto", "--kto-beta", "0.2", "--kto-desirable-weight", "1.5",
        "--data", str(example_path("kto")), "--steps", "1", "--grad-accumulation", "1", "--output", str(tmp_path / "kto"),
        "--no-progress", "--report-to", "none",
    )  # fmt: skip
    assert res.status == 0, res.stderr
    assert "final_loss" in res.stdout


def test_preference_methods_refuse_full_fine_tuning():
    for method in ("orpo", "simpo", "kto"):
        with pytest.raises(ConfigError) as err:
            TrainConfig(method=method, mode="full").validate()
        assert err.value.code == "CONFIG_INVALID_SETTING" and "LoRA" in err.value.message
    res = run_cli("train", "--method", "orpo", "--mode", "full", "--steps", "1")
    assert res.status == 2 and "CONFIG_INVALID_SETTING" in res.stderr


def test_data_that_does_not_fit_the_method_is_refused_before_loading(tiny_llama, tmp_path):
    for method, data in (("orpo", "chat"), ("kto", "chat"), ("sft", "preference"), ("simpo", "kto")):
        with pytest.raises(InputError) as err:
            Trainer("tiny-llama", method=method, output_dir=str(tmp_path / method), **QUIET).train(
                example_path(data), steps=1
            )
        assert err.value.code == "INPUT_DATASET_VALIDATION_FAILED" and method in err.value.message


def test_learning_rate_follows_the_method_unless_set():
    assert Trainer("tiny-llama").config.learning_rate == 2e-3  # the tiny preset's SFT rate
    assert Trainer("tiny-llama", method="orpo").config.learning_rate == 8e-6
    assert Trainer("tiny-llama", method="orpo", learning_rate=1e-4).config.learning_rate == 1e-4


@pytest.mark.parametrize("option", ["orpo_beta", "simpo_beta", "kto_beta", "kto_desirable_weight"])
def test_preference_knobs_are_checked(option):
    with pytest.raises(ConfigError, match=option):
        TrainConfig(**{option: 0.0}).validate()


def test_pairs_of_finds_each_pairs_two_answers(pairs):
    batch = pairs.batch_of(pairs.row_samples(0)[::-1].copy())
    chosen, rejected = pairs_of(batch, pairs)
    ids = batch.sample_index
    assert pairs.chosen[ids[chosen]].all() and not pairs.chosen[ids[rejected]].any()
    assert np.array_equal(pairs.pair_id[ids[chosen]], pairs.pair_id[ids[rejected]])


# ---- reasoning traces --------------------------------------------------------------------

TRACES = __import__("pathlib").Path(__file__).parent / "data" / "traces_mixed.jsonl"
TRACE_DROPS = {"trace_empty": 2, "trace_unbalanced": 3, "trace_too_long": 1}


def test_reasoning_trace_run_reports_each_drop_reason(tiny_qwen2, tmp_path, caplog):
    from transformers import AutoTokenizer

    trainer = Trainer(
        "tiny-qwen2", reasoning_trace=True, trace_max_tokens=200, output_dir=str(tmp_path / "run"),
        grad_accumulation=1, **QUIET,
    )  # fmt: skip
    assert trainer.config.max_seq_length == 8192
    assert Trainer("tiny-qwen2", reasoning_trace=True, max_seq_length=1024).config.max_seq_length == 1024
    with caplog.at_level("INFO", logger="backpropagate"):
        result = trainer.train(TRACES, steps=1)
    assert result.data_stats["dropped"] == TRACE_DROPS and result.data_stats["rows_used"] == 6
    assert "6 of 12 rows used; 6 dropped (trace_empty: 2, trace_too_long: 1, trace_unbalanced: 3)" in caplog.text
    # <think> is plain text: no token was added, and the answer's labels hold the trace with its tags.
    base, saved = AutoTokenizer.from_pretrained(tiny_qwen2), AutoTokenizer.from_pretrained(result.adapter_dir)
    assert len(saved) == len(base) and "<think>" not in base.get_added_vocab()
    config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert not config.get("modules_to_save") and not config.get("trainable_token_indices")
    dataset = prepare(TRACES, tiny_qwen2, DataConfig(reasoning_trace=True, trace_max_tokens=200, cache=False))
    labels = dataset.labels[dataset.sample_offsets[0] : dataset.sample_offsets[1]]
    assert base.decode([t for t in labels if t != IGNORE_INDEX]).startswith("<think>I need 2 times 3.")


def test_reasoning_trace_through_the_cli(tiny_llama, tmp_path):
    res = run_cli(
        "train", "--reasoning-trace", "--trace-max-tokens", "200", "--data", str(TRACES), "--steps", "1",
        "--grad-accumulation", "1", "--output", str(tmp_path / "run"), "--no-progress", "--report-to", "none", "--json",
    )  # fmt: skip
    assert res.status == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["dropped"] == TRACE_DROPS and summary["rows_used"] == 6
    run = json.loads((tmp_path / "run" / "adapter" / "backpropagate_run.json").read_text())
    assert run["data_config"]["reasoning_trace"] is True and run["hyperparameters"]["max_seq_length"] == 8192
